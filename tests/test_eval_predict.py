"""python -m mnist_cnn.eval and python -m mnist_cnn.predict as real processes, real checkpoints;
one full epoch's model: 98% on MNIST, 95% on digits as users draw them."""

import numpy as np
import pytest
import torch
from conftest import FAST, cli, compose_train, tiny_cfg
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.datasets import MNIST

from mnist_cnn.images import open_image, prepare
from mnist_cnn.train import train


def run_cfg(out, data_dir, *overrides):
    base = (
        "trainer.accelerator=cpu",
        f"paths.output_dir={out}",
        f"paths.log_dir={out}",
        f"data.data_dir={data_dir}",
        "callbacks.progress_bar.refresh_rate=0",
    )
    return compose_train(*base, *overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("tiny")
    train(run_cfg(out, data_dir, *FAST))  # debug=fast's batches, with checkpoints
    return out


def user_style(digit: np.ndarray, rng, mode: str = "L") -> Image.Image:
    """An MNIST digit as a user would draw it: dark ink on white, upscaled, off-centre on a
    larger canvas."""
    size = int(rng.integers(60, 140))
    ink = Image.fromarray(255 - digit).resize((size, size), Image.BILINEAR)
    canvas = Image.new("L", (size + int(rng.integers(20, 120)), size + int(rng.integers(20, 90))))
    canvas.paste(255, (0, 0, *canvas.size))
    canvas.paste(ink, (int(rng.integers(0, canvas.width - size)), int(rng.integers(0, 10))))
    return canvas.convert(mode)


@pytest.mark.slow
def test_eval_of_a_checkpoint_equals_the_test_metrics_its_run_recorded(
    tiny_run, tmp_path, data_dir
):
    events = EventAccumulator(str(tiny_run / "tensorboard"))
    events.Reload()
    recorded = {tag: events.Scalars(tag)[-1].value for tag in ("test/acc", "test/loss")}
    (best,) = (tiny_run / "checkpoints").glob("epoch*.ckpt")  # the run tested its best one

    args = [f"ckpt_path={best}", f"data.data_dir={data_dir}", "trainer.accelerator=cpu"]
    proc = cli("eval", *args, "trainer.limit_test_batches=2", cwd=tmp_path)  # as debug=fast
    printed = dict(line.split() for line in proc.stdout.splitlines() if line.startswith("test/"))
    assert printed.keys() == recorded.keys()
    for tag, value in recorded.items():
        assert float(printed[tag]) == pytest.approx(value, abs=1e-6), tag
    assert list(tmp_path.iterdir()) == []  # eval only reads: no run dir, no logs


@pytest.mark.slow
def test_eval_names_a_bad_checkpoint_and_exits_2(tmp_path):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    for args, words in (([f"ckpt_path={bogus}"], str(bogus)), ([], "ckpt_path is required")):
        proc = cli("eval", *args, cwd=tmp_path, code=2)
        output = proc.stdout + proc.stderr
        assert words in output, output
        assert "ckpt_path=" in output and "Traceback" not in output


def test_preprocess_turns_a_user_style_image_back_into_the_mnist_digit(data_dir):
    digits = MNIST(str(data_dir), train=False).data[:50].numpy()
    rng = np.random.default_rng(0)
    for digit in digits:
        original = torch.from_numpy(digit).float() / 255
        assert (prepare(Image.fromarray(digit))[0] - original).abs().mean() < 0.02
        x = prepare(user_style(digit, rng))
        assert x.shape == (1, 28, 28) and x.min() >= 0 and 0.5 < x.max() <= 1
        assert (x[0] - original).abs().mean() < 0.1  # the same digit, resampled twice


def test_open_image_flattens_transparency_onto_white(tmp_path):
    image = Image.new("RGBA", (50, 50), (0, 0, 0, 0))  # transparent black background
    image.paste((0, 0, 0, 255), (20, 10, 30, 40))  # an opaque black bar: a "1"
    image.save(tmp_path / "one.png")
    x = prepare(open_image(tmp_path / "one.png"))[0]
    assert x[0, 0] == 0 and x[14, 14] > 0.5  # ink in the middle, black background
    with pytest.raises(ValueError, match="blank"):
        prepare(Image.new("L", (30, 30), 255))


@pytest.mark.slow
def test_predict_reports_missing_and_unreadable_files_and_classifies_the_rest(
    tiny_run, tmp_path, data_dir
):
    digit = MNIST(str(data_dir), train=False).data[0].numpy()
    good = tmp_path / "good.png"
    user_style(digit, np.random.default_rng(1)).save(good)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])  # a truncated download
    (tmp_path / "notes.txt").write_text("not an image, and not an image suffix")
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "scan.pdf").write_bytes(b"%PDF-1.4")

    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    inputs = f"inputs=[{tmp_path},{tmp_path}/gone.png,{tmp_path}/empty,{tmp_path}/no_images]"
    proc = cli("predict", f"ckpt_path={ckpt}", inputs, cwd=tmp_path, code=1)
    (line,) = proc.stdout.splitlines()
    file, name, index, probability = line.split("\t")  # the class name, then its index
    assert file == str(good) and 0 <= int(index) <= 9 and 0 < float(probability) <= 1
    assert name == index  # MNIST's class names are the digits
    errors = proc.stderr.splitlines()
    for name in ("corrupt.png", "cut.png", "gone.png"):
        assert sum(name in e and e.startswith("error: ") for e in errors) == 1, (name, errors)
    for folder in ("empty", "no_images"):  # named, with the suffixes looked for
        (error,) = [e for e in errors if e.startswith(f"error: {tmp_path / folder}: ")]
        assert "no images" in error and ".png" in error and ".jpg" in error, error
    assert "notes.txt" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def full_epoch(tmp_path_factory, data_dir):
    """One full epoch on the 50,000 images, then the test set: ``(run dir, metrics)``."""
    out = tmp_path_factory.mktemp("epoch")
    limits = [f"trainer.{k}_batches=null" for k in ("limit_train", "limit_val", "limit_test")]
    return out, train(tiny_cfg(out, data_dir, "trainer.max_epochs=1", *limits))


@pytest.mark.slow
def test_one_full_epoch_reaches_98_percent(full_epoch):
    _, metrics = full_epoch
    assert metrics["val/acc"] >= 0.98 and metrics["test/acc"] >= 0.98


@pytest.mark.slow
def test_predict_classifies_user_style_mnist_test_digits_with_95_percent(
    full_epoch, tmp_path, data_dir
):
    test = MNIST(str(data_dir), train=False)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(test), size=300, replace=False)
    images = tmp_path / "digits"
    images.mkdir()
    labels = {}
    for n, i in enumerate(picks):
        mode, suffix = [("L", "png"), ("RGB", "png"), ("RGBA", "png"), ("RGB", "jpg")][n % 4]
        path = images / f"{n:03d}.{suffix}"
        user_style(test.data[i].numpy(), rng, mode).save(path)
        labels[str(path)] = int(test.targets[i])
    (images / "broken.png").write_bytes(b"this is not a PNG")

    ckpt = full_epoch[0] / "checkpoints" / "last.ckpt"
    proc = cli("predict", f"ckpt_path={ckpt}", f"inputs=[{images}]", cwd=tmp_path, code=1)
    assert "broken.png" in proc.stderr, proc.stderr[-3000:]
    rows = (line.split("\t") for line in proc.stdout.splitlines())
    predicted = {f: int(index) for f, _, index, _ in rows}
    assert predicted.keys() == labels.keys()
    accuracy = np.mean([predicted[f] == label for f, label in labels.items()])
    assert accuracy >= 0.95, accuracy
