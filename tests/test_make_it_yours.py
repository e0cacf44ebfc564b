"""The three recipes of the README's "Make it yours", as a researcher runs them: a network and a
datamodule of their own (tests/user_code: a module and one YAML each, through --config-dir), a
metric added on the command line, and a folder of their own images; then eval, predict and
export follow the checkpoint. Nothing inside the package is edited."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, digits_as_png
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.datasets import MNIST

from mnist_cnn.checkpoint import load_model

USER_CODE = Path(__file__).parent / "user_code"
QUIET = ["callbacks.progress_bar.refresh_rate=0", "trainer.accelerator=cpu"]


@pytest.mark.slow
def test_own_network_datamodule_and_metric_through_the_cli(tmp_path, data_dir):
    work = tmp_path / "project"
    shutil.copytree(USER_CODE, work)  # a researcher's folder: my_nets.py, my_data.py, conf/
    f1 = "+model.metrics.f1={_target_:torchmetrics.classification.MulticlassF1Score,average:macro}"
    out = cli(
        "train",
        "--config-dir",
        str(work / "conf"),
        "model/net=small_bn",
        "data=first_digits",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={work / 'outputs'}",
        f1,
        "callbacks.model_checkpoint.monitor=val/f1",
        "optimized_metric=val/f1",
        "trainer.max_epochs=2",
        *QUIET,
        cwd=work,
    )
    (run,) = (work / "outputs" / "runs").iterdir()
    assert re.search(
        r"epoch 2/2 \| train loss \S+ acc \S+ f1 \S+ \| val loss \S+ acc \S+ f1",
        out.stdout + out.stderr,
    )
    (best,) = (run / "checkpoints").glob("epoch*.ckpt")
    hp = torch.load(best, weights_only=True)["hyper_parameters"]
    assert hp["net"]["_target_"] == "my_nets.SmallBNNet" and hp["classes"] == ["zero", "one", "two"]
    assert hp["datamodule"]["_target_"] == "my_data.FirstDigits"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"val/f1", "test/f1", "train/f1"} <= set(events.Tags()["scalars"])
    assert (run / "figures" / "confusion_matrix.png").exists()

    # eval: the data the checkpoint was trained on, by default
    evaluated = cli("eval", f"ckpt_path={best}", *QUIET[1:], cwd=work)
    assert "my_data.FirstDigits" in evaluated.stdout + evaluated.stderr
    assert "test/f1" in evaluated.stdout
    # predict: class names; export: ONNX and model.pt
    mnist = MNIST(str(data_dir), train=False)
    for i in range(6):
        Image.fromarray(255 - mnist.data[i].numpy()).save(
            work / f"digit{i}_{int(mnist.targets[i])}.png"
        )
    predicted = cli("predict", f"ckpt_path={best}", f"inputs=[{work}]", cwd=work)
    assert re.search(r"digit\S+\.png\t(zero|one|two)\t[0-2]\t", predicted.stdout), predicted.stdout
    cli("export", f"ckpt_path={best}", f"output={work / 'net.onnx'}", cwd=work)
    cli("export", f"ckpt_path={best}", "format=pt", f"output={work / 'net.pt'}", cwd=work)
    assert (work / "net.onnx").stat().st_size > 0 and (work / "net.pt").stat().st_size > 0


@pytest.mark.slow
def test_a_folder_of_own_images_with_lenet5(tmp_path, data_dir):
    folder = tmp_path / "shapes"
    labels = {0: "circle", 1: "stick", 7: "seven"}  # three classes, named
    digits_as_png(data_dir, folder / "train", labels, per_class=120)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    args = [
        "data=image_folder",
        f"data.data_dir={folder}",
        "data.image_size=32",
        "model/net=lenet5",
    ]
    args += [f"paths.log_dir={tmp_path / 'outputs'}", "trainer.max_epochs=3", *QUIET]
    cli("train", *args, cwd=tmp_path)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # only read
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    (best,) = (run / "checkpoints").glob("epoch*.ckpt")
    model = load_model(best)
    assert model.hparams.classes == ["circle", "seven", "stick"] and model.hparams.image_size == 32
    assert type(model.net).__name__ == "LeNet5"
    evaluated = cli("eval", f"ckpt_path={best}", cwd=tmp_path)
    accuracy = float(re.search(r"test/acc (\S+)", evaluated.stdout)[1])
    assert accuracy > 0.8 and "ImageFolderDataModule" in evaluated.stdout + evaluated.stderr
    renamed = tmp_path / "renamed" / "train"  # the same images, the classes named otherwise
    for old, new in (("circle", "zero"), ("seven", "one"), ("stick", "two")):
        shutil.copytree(folder / "train" / old, renamed / new)
    # was test/acc 0.000000 with no word
    refused = cli(
        "eval", f"ckpt_path={best}", f"data.data_dir={renamed.parent}", cwd=tmp_path, code=2
    )
    said = refused.stdout + refused.stderr
    assert "Traceback" not in said, said[-3000:]
    assert "classes (one, two, zero) are not the checkpoint's (circle, seven, stick)" in said
    sample = tmp_path / "sample"
    digits_as_png(data_dir, sample, {7: "x"}, per_class=3)
    predicted = cli("predict", f"ckpt_path={best}", f"inputs=[{sample / 'x'}]", cwd=tmp_path)
    assert predicted.stdout.count("\tseven\t") >= 2, predicted.stdout
    cli("export", f"ckpt_path={best}", f"output={tmp_path / 'lenet.onnx'}", cwd=tmp_path)


def test_the_datamodule_works_outside_a_trainer(data_dir):
    from mnist_cnn.data import MNISTDataModule
    from mnist_cnn.module import Classifier

    dm = MNISTDataModule(str(data_dir))
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))  # what a notebook gets: uint8 images
    model = Classifier().eval()
    with torch.no_grad():
        as_loaded = model(x[:8])
        as_trained = model(dm.on_after_batch_transfer((x[:8], y[:8]), 0)[0])  # the Trainer's
    assert x.dtype == torch.uint8 and torch.allclose(as_loaded, as_trained)


def test_the_image_folder_splits_by_seed_and_counts_its_classes(tmp_path, data_dir):
    from mnist_cnn.image_folder import ImageFolderDataModule

    digits_as_png(data_dir, tmp_path / "train", {3: "three", 4: "four"}, per_class=10)
    dm = ImageFolderDataModule(str(tmp_path), channels=3, image_size=16, val_fraction=0.2)
    dm.setup("fit")
    assert dm.classes == ["four", "three"] and dm.train_set.images.shape[1:] == (3, 16, 16)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (14, 4, 2)
    assert np.unique(dm.train_set.targets.numpy()).tolist() == [0, 1]
