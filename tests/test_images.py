"""mnist_cnn.images: awkward and hostile files read safely, in-process and through the real
``python -m mnist_cnn.predict`` with a real checkpoint."""

import os
import socket
import time

import numpy as np
import pytest
import torch
from conftest import bomb_png, cli, forged_png, parse, photo, save_jpeg, small_checkpoint
from PIL import Image
from torchvision.datasets import MNIST

from mnist_cnn.images import ImageError, class_names, open_image, prepare, spec

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, data_dir):
    return small_checkpoint(tmp_path_factory, data_dir)


@pytest.fixture(scope="module")
def named_ckpt(ckpt, tmp_path_factory):
    """The same checkpoint with its classes named in words: predict prints these names."""
    state = torch.load(ckpt, weights_only=True)
    record = state["mnist_cnn"]  # the module's constructor call and data, which the tools read
    state["hyper_parameters"]["classes"] = record["module"]["classes"] = WORDS
    record["data"]["classes"] = WORDS
    path = tmp_path_factory.mktemp("named") / "words.ckpt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def mnist_test(data_dir):
    return MNIST(str(data_dir), train=False)


def test_every_exif_orientation_is_undone(mnist_test, tmp_path):
    upright = photo(mnist_test.data[0].numpy())
    reference = np.asarray(open_image(save_jpeg(upright, tmp_path / "upright.jpg")), np.float32)
    assert reference.shape == (260, 300, 3)
    for orientation in range(1, 9):
        path = save_jpeg(upright, tmp_path / f"o{orientation}.jpg", orientation)
        read = np.asarray(open_image(path), np.float32)
        assert read.shape == reference.shape, orientation
        assert np.abs(read - reference).mean() < 2, orientation  # JPEG noise only
        if orientation > 1:  # the pixels as stored are another picture: the tag is what counts
            stored = np.asarray(Image.open(path).convert("RGB"), np.float32)
            assert stored.shape != reference.shape or np.abs(stored - reference).mean() > 10


@pytest.mark.slow
def test_predict_reads_phone_jpegs_upright_from_their_exif_orientation(
    named_ckpt, mnist_test, tmp_path
):
    folder = tmp_path / "phone"
    folder.mkdir()
    for i in range(12):
        picture = photo(mnist_test.data[i].numpy())
        save_jpeg(picture, folder / f"{i:02d}_upright.jpg")
        orientation = (6, 8, 3)[i % 3]  # held left, right, upside down
        save_jpeg(picture, folder / f"{i:02d}_turned.jpg", orientation)

    # the orientation is undone: the turned photo reads as the upright one, up to JPEG noise (a
    # comparison of the model's inputs, so it holds whatever the CPU's kernels)
    for i in range(12):
        upright = np.asarray(open_image(folder / f"{i:02d}_upright.jpg"), np.float32)
        turned = np.asarray(open_image(folder / f"{i:02d}_turned.jpg"), np.float32)
        assert turned.shape == upright.shape and np.abs(turned - upright).mean() < 2, i

    proc = cli(
        "predict", f"ckpt_path={named_ckpt}", f"inputs=[{folder}]", cwd=tmp_path, timeout=120
    )
    answers = parse(proc.stdout)
    assert len(answers) == 24
    for i in range(12):
        turned, upright = answers[f"{i:02d}_turned.jpg"], answers[f"{i:02d}_upright.jpg"]
        assert turned[:2] == upright[:2], (i, turned, upright)  # same class name and index
        assert turned[0] == WORDS[turned[1]]  # the checkpoint's name for the class


def test_16_bit_png_is_scaled_not_clipped(mnist_test, tmp_path):
    digit = 255 - mnist_test.data[1].numpy()  # dark ink on white
    Image.fromarray(digit).save(tmp_path / "eight.png")
    Image.fromarray(digit.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    clipped = np.asarray(Image.open(tmp_path / "sixteen.png").convert("L"))
    assert set(np.unique(clipped)) == {0, 255}  # a plain convert clips: all grey becomes white
    assert len(np.unique(digit)) > 50
    read = open_image(tmp_path / "sixteen.png")
    assert read.mode == "L" and np.array_equal(np.asarray(read), digit)
    assert torch.equal(prepare(read), prepare(open_image(tmp_path / "eight.png")))


def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch):
    bomb, forged = tmp_path / "bomb.png", tmp_path / "forged.png"
    bomb.write_bytes(bomb_png())
    forged.write_bytes(forged_png())
    assert bomb.stat().st_size < 200_000 and forged.stat().st_size < 100
    for source in (bomb, forged, bomb.read_bytes(), forged.read_bytes()):
        start = time.monotonic()
        with pytest.raises(ImageError, match="decompression bomb") as error:
            open_image(source)
        assert time.monotonic() - start < 2  # refused from the header, nothing decoded
        assert "MAX_IMAGE_PIXELS" in str(error.value) and "scale it down" in str(error.value)
    assert "10,000,000,000 pixels" in str(pytest.raises(ImageError, open_image, forged).value)
    # Pillow's own limit, whatever it is set to: 1,200 pixels is over 1,000 (a warning in Pillow)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("L", (40, 30)).save(tmp_path / "small.png")
    Image.new("L", (30, 30)).save(tmp_path / "smaller.png")
    with pytest.raises(ImageError, match="1,000 pixels"):
        open_image(tmp_path / "small.png")
    assert open_image(tmp_path / "smaller.png").size == (30, 30)


def test_sockets_devices_folders_and_junk_are_refused_by_name(tmp_path):
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "s.png"))
        with pytest.raises(ImageError, match="a socket"):
            open_image(tmp_path / "s.png")
    (tmp_path / "y.png").mkdir()
    (tmp_path / "text.png").write_text("hello")
    for source, words in (
        ("/dev/null", "/dev/null: a character device, not an image file"),
        (tmp_path / "y.png", "y.png: a folder, not an image file"),
        (tmp_path / "gone.png", "gone.png: no such file"),
        (tmp_path / "text.png", "text.png: not an image Pillow can read"),
        (b"", "the image: empty"),
        (b"\x89PNG\r\n\x1a\n", "the image: not an image Pillow can read"),
    ):
        with pytest.raises(ImageError) as error:
            open_image(source)
        assert words in str(error.value), error.value


@pytest.mark.slow
def test_predict_reports_fifos_folders_devices_and_bombs_by_name_and_reads_the_rest(
    ckpt, mnist_test, tmp_path
):
    folder = tmp_path / "inbox"
    folder.mkdir()
    digit = 255 - mnist_test.data[2].numpy()
    Image.fromarray(digit).save(folder / "good.png")
    Image.fromarray(digit.astype(np.uint16) * 257).save(folder / "good16.png")
    os.mkfifo(folder / "x.png")  # nobody ever writes: opening it for reading would wait forever
    (folder / "y.png").mkdir()
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "forged.png").write_bytes(forged_png())

    start = time.monotonic()
    inputs = f"inputs=[{folder},{folder / 'x.png'},/dev/null]"
    # a FIFO that blocked predict would hit the timeout (a failure)
    proc = cli("predict", f"ckpt_path={ckpt}", inputs, cwd=tmp_path, code=1, timeout=120)
    assert time.monotonic() - start < 90
    answers = parse(proc.stdout)
    assert answers.keys() == {"good.png", "good16.png"}
    assert answers["good16.png"] == answers["good.png"]  # the 16-bit copy reads the same
    assert answers["good.png"][1] == int(mnist_test.targets[2])
    errors = [e for e in proc.stderr.splitlines() if e.startswith("error: ")]
    expected = {
        f"{folder / 'x.png'}: a FIFO (named pipe), not an image file": 2,  # in the folder, named
        f"{folder / 'y.png'}: a folder, not an image file": 1,
        f"{folder / 'bomb.png'}: 90,250,000 pixels is more than Pillow's limit": 1,
        f"{folder / 'forged.png'}: 10,000,000,000 pixels is more than Pillow's limit": 1,
        "/dev/null: a character device, not an image file": 1,
    }
    for words, count in expected.items():
        assert sum(e.startswith(f"error: {words}") for e in errors) == count, (words, errors)
    assert len(errors) == 6 and "Traceback" not in proc.stderr


def test_prepare_styles_sizes_and_channels(mnist_test):
    digit = Image.fromarray(mnist_test.data[3].numpy())
    x28 = prepare(digit)
    assert x28.shape == (1, 28, 28) and x28.dtype == torch.float32
    x56 = prepare(digit, image_size=56)
    assert x56.shape == (1, 56, 56)
    rows, cols = torch.nonzero(x56[0] > 0.2, as_tuple=True)
    assert rows.max() - rows.min() < 41 and cols.max() - cols.min() < 41  # 20/28 of 56 = 40
    weights = x56[0].sum()
    cy = (x56[0].sum(1) * torch.arange(56)).sum() / weights
    cx = (x56[0].sum(0) * torch.arange(56)).sum() / weights
    assert abs(cy - 28) <= 1 and abs(cx - 28) <= 1  # centre of mass in the middle
    three = prepare(digit, channels=3)
    assert three.shape == (3, 28, 28) and torch.equal(three[0], three[2])

    colour = Image.new("RGB", (64, 48), (255, 0, 0))
    colour.paste((0, 0, 255), (32, 0, 64, 48))
    rgb = prepare(colour, channels=3, image_size=32, style="resize")
    assert rgb.shape == (3, 32, 32)
    assert rgb[:, 16, 2].tolist() == [1, 0, 0] and rgb[:, 16, 30].tolist() == [0, 0, 1]
    grey = prepare(colour, channels=1, image_size=16, style="resize")
    assert grey.shape == (1, 16, 16) and 0 < grey.mean() < 1
    with pytest.raises(ImageError, match="blank"):
        prepare(Image.new("L", (30, 30), 255))
    with pytest.raises(ValueError, match="mnist, resize"):
        prepare(digit, style="crop")


def test_spec_and_class_names_read_a_checkpoints_hyper_parameters():
    assert spec({}) == {"channels": 1, "image_size": 28, "style": "mnist"}
    hparams = {"channels": 3, "image_size": 32, "preprocess": "resize", "classes": ["cat", "dog"]}
    assert spec(hparams) == {"channels": 3, "image_size": 32, "style": "resize"}
    assert class_names({}) == [str(i) for i in range(10)]
    assert class_names(hparams) == ["cat", "dog"]
    for bad in ({"preprocess": "crop"}, {"channels": 2}, {"image_size": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
            spec(bad)
