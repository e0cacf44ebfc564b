"""Figures and TensorBoard: what a real (tiny) training run leaves to look at."""

import io

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata
from torchmetrics.classification import MulticlassConfusionMatrix

from mnist_cnn.plots import confusion_matrix, prediction_grid
from mnist_cnn.train import train

FIGURES = ("learning_curves", "predictions", "confusion_matrix")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """Two tiny epochs and a test, with the default callbacks and the TensorBoard logger."""
    out = tmp_path_factory.mktemp("run")
    args = ("trainer.max_epochs=2", "model.optimizer.lr=0.002", "tags=[a,b]")
    cfg = tiny_cfg(out, data_dir, *args, figures=True)
    return out, train(cfg)


@pytest.mark.slow
def test_each_run_writes_the_three_figures_as_png(run):
    out, _ = run
    for name in FIGURES:
        path = out / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as image:
            image.verify()  # a complete, uncorrupted PNG
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 300, (name, image.size)


def test_tensorboard_holds_each_epochs_scalars_the_lr_the_test_and_the_figures(run):
    out, metrics = run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    steps = {}
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "lr-Adam"):
        steps[tag] = [e.step for e in events.Scalars(tag)]
        assert len(steps[tag]) == 2, (tag, steps[tag])  # one value per epoch
    assert steps["train/loss"] == steps["val/acc"] and steps["val/acc"][0] < steps["val/acc"][1]
    assert [e.value for e in events.Scalars("lr-Adam")] == pytest.approx([0.002, 0.002])
    for tag in ("test/acc", "test/loss"):
        assert [e.value for e in events.Scalars(tag)] == pytest.approx([metrics[tag]]), tag
    for name in FIGURES:
        (image,) = events.Images(f"figures/{name}")
        assert image.encoded_image_string[:4] == b"\x89PNG" and image.width >= 300
        shown = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
        saved = np.asarray(Image.open(out / "figures" / f"{name}.png").convert("RGB"))
        assert np.array_equal(shown, saved), name  # TensorBoard shows the saved figure


def test_hparams_tab_lists_the_config_with_the_final_metrics_as_columns(run):
    out, _ = run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    start = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = metadata.parse_session_start_info_plugin_data(start).hparams
    assert hparams["model.optimizer.lr"].number_value == pytest.approx(0.002)
    assert hparams["data.batch_size"].number_value == 64
    assert hparams["trainer.max_epochs"].number_value == 2
    assert hparams["model.net.channels"].string_value == "[32, 64]"
    assert hparams["tags"].string_value == "a, b"
    experiment = events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    columns = {m.name.tag for m in metadata.parse_experiment_plugin_data(experiment).metric_infos}
    assert {"val/acc_best", "test/acc", "test/loss"} <= columns
    scalars = set(events.Tags()["scalars"])
    assert columns <= scalars  # each column reads a scalar the run logged


def test_prediction_grid_marks_the_wrong_predictions():
    images = torch.rand(12, 1, 28, 28)
    labels = torch.arange(12) % 10
    preds = labels.clone()
    preds[[3, 7]] = 0
    fig = prediction_grid(images, labels, preds)
    titles = [(ax.get_title(), ax.title.get_color()) for ax in fig.axes]
    assert len(fig.axes) == 12
    assert titles[3] == ("0 (true 3)", "r") and titles[7] == ("0 (true 7)", "r")
    assert titles[4] == ("4", "k")
    assert sum(color == "r" for _, color in titles) == 2


@pytest.mark.parametrize("classes, texts", [(10, 100), (300, 0)])
def test_the_confusion_matrix_of_many_classes_is_drawn_without_a_text_per_cell(classes, texts):
    metric = MulticlassConfusionMatrix(num_classes=classes)
    metric.update(torch.arange(600) % classes, torch.arange(600) % classes)
    fig = confusion_matrix(metric, [f"class {i}" for i in range(classes)])
    (ax, *_) = fig.axes
    assert len(ax.texts) == texts  # torchmetrics' plot: one per cell, the reduced form: none
    assert f"{classes} classes" in ax.get_title() or classes <= 30
    fig.canvas.draw()


@pytest.mark.slow
def test_a_confusion_matrix_over_max_classes_is_skipped_with_a_line(
    tmp_path, data_dir, monkeypatch, caplog
):
    monkeypatch.setattr("mnist_cnn.plots.MAX_CLASSES", 5)  # MNIST's 10 classes are too many
    with caplog.at_level("INFO", "mnist_cnn.plots"):
        train(tiny_cfg(tmp_path, data_dir, figures=True))
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "learning_curves.png",
        "predictions.png",
    ]
    assert "confusion_matrix.png is not drawn: 10 classes, more than the 5" in caplog.text
