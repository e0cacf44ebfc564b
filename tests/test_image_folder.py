"""data=image_folder on messy folders, as users make them: symbolic links (a loop, a link out of
the dataset), hidden entries (Jupyter's .ipynb_checkpoints/, macOS's ._ files), unreadable
images, one class, an empty class, a name that is not UTF-8, and 1,000 classes. Real MNIST
digits as PNG files; the CLI where its one line and exit status are the point."""

import logging
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import cli, digits_as_png, forged_png
from PIL import Image
from torchvision.datasets import MNIST

from mnist_cnn.errors import DataError
from mnist_cnn.image_folder import ImageFolderDataModule

LABELS = {0: "0", 1: "1", 2: "2"}
FAST = ["debug=fast", "trainer.accelerator=cpu", "callbacks.progress_bar.refresh_rate=0"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, data_dir) -> Path:
    """train/ with three classes of 40 real digits each (120 images), written once."""
    folder = tmp_path_factory.mktemp("clean")
    digits_as_png(data_dir, folder / "train", LABELS, per_class=40)
    return folder


@pytest.fixture
def folder(clean, tmp_path) -> Path:
    """A copy of ``clean`` for this test to spoil."""
    shutil.copytree(clean, tmp_path / "my_data")
    return tmp_path / "my_data"


def messy(folder: Path, outside: Path) -> list[Path]:
    """``folder`` spoiled the ways the issue found; returns the unreadable images it gained."""
    train = folder / "train"
    shutil.copytree(train / "0", train / ".ipynb_checkpoints")  # would be a 4th class
    (train / "0" / "loop").symlink_to("..")  # 40 levels of the other classes, once
    outside.mkdir()
    shutil.copytree(train / "1", outside / "elsewhere")
    (train / "2" / "out").symlink_to(outside / "elsewhere")  # a link out of the dataset
    (train / "1" / "linked.png").symlink_to(
        outside / "elsewhere" / next(os.walk(train / "1"))[2][0]
    )
    (train / "1" / "._1.png").write_bytes(b"\x00\x05\x16\x07AppleDouble junk")
    (train / "0" / ".hidden").mkdir()
    shutil.copy(next((train / "2").glob("*.png")), train / "0" / ".hidden" / "x.png")
    png = next((train / "0").glob("*.png")).read_bytes()
    truncated, huge = train / "0" / "truncated.png", train / "2" / "huge.png"
    truncated.write_bytes(png[: len(png) // 2])
    huge.write_bytes(forged_png())  # a header claiming 100000 x 100000 pixels
    return [truncated, huge]


def test_no_link_is_followed_and_hidden_entries_are_skipped(folder, tmp_path, caplog):
    bad = messy(folder, tmp_path / "outside")
    dm = ImageFolderDataModule(str(folder), val_fraction=0.2, test_fraction=0)
    with caplog.at_level(logging.INFO, "mnist_cnn.image_folder"):
        dm.setup("fit")
    assert dm.classes == ["0", "1", "2"]  # no .ipynb_checkpoints class
    assert len(dm.train_set) + len(dm.val_set) == 120  # the real images, each once
    counts = dm.train_set.targets.bincount(minlength=3) + dm.val_set.targets.bincount(minlength=3)
    assert counts.tolist() == [40, 40, 40]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert [s.split(":")[0] for s in skipped] == [f"skipped {p}" for p in bad]  # named, each
    assert "damaged or truncated" in skipped[0] and "10,000,000,000 pixels" in skipped[1]
    links = next(r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage())
    assert (
        "3 symbolic link(s) not followed" in links and str(folder / "train" / "0" / "loop") in links
    )


def test_an_unreadable_image_stops_the_run_when_asked(folder, tmp_path):
    bad = messy(folder, tmp_path / "outside")
    dm = ImageFolderDataModule(str(folder), bad_images="error")
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad[0]))}: a damaged or truncated"):
        dm.setup("fit")


def spoil(folder: Path, how: str) -> str:
    """Spoil ``folder`` one way; the words its one error line must hold."""
    train = folder / "train"
    if how == "one class":
        shutil.rmtree(train / "1")
        shutil.rmtree(train / "2")
        return f"{train} needs a sub-folder per class, two or more (found only '0')"
    if how == "empty class":
        (train / "3").mkdir()
        (train / "3" / ".DS_Store").write_bytes(b"junk")
        return f"The class folder {train / '3'} has no images"
    if how == "all unreadable":
        for png in (train / "2").glob("*.png"):
            png.write_bytes(b"not a png")
        return f"The class folder {train / '2'} has no image that can be read"
    if how == "not UTF-8":
        os.rename(os.fsencode(train / "2"), os.fsencode(train) + b"/caf\xe9")
        return f"The class folder {train}/caf\\xe9 has a name that is not valid UTF-8: rename it"
    raise ValueError(how)


SPOILS = ["one class", "empty class", "all unreadable", "not UTF-8"]


@pytest.mark.parametrize("how", SPOILS)
def test_a_dataset_that_cannot_train_is_refused_naming_the_folder(folder, how):
    words = spoil(folder, how)
    with pytest.raises(DataError) as raised:
        ImageFolderDataModule(str(folder)).setup("fit")
    assert words in str(raised.value)


@pytest.mark.slow
def test_the_cli_trains_on_a_messy_folder_naming_what_it_skipped(folder, tmp_path):
    bad = messy(folder, tmp_path / "outside")
    where = [f"data.data_dir={folder}", f"paths.log_dir={tmp_path / 'outputs'}"]
    proc = cli("train", "data=image_folder", *FAST, *where, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert f"{folder / 'train'}: 120 images, 3 classes" in out
    for path in bad:
        assert f"skipped {path}: " in out
    assert "Traceback" not in out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["not UTF-8", "bad_images=error"])  # each kind: in-process
def test_the_cli_refuses_in_one_line_and_exit_2(folder, tmp_path, how):
    if how == "bad_images=error":
        (truncated, _) = messy(folder, tmp_path / "outside")
        words, args = f"{truncated}: a damaged or truncated image", ["data.bad_images=error"]
    else:
        words, args = spoil(folder, how), []
    where = [f"data.data_dir={folder}", f"paths.log_dir={tmp_path / 'outputs'}"]
    proc = cli("train", "data=image_folder", *FAST, *args, *where, cwd=tmp_path, code=2)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if "ERROR" in line or "Error" in line]
    assert len(errors) == 1 and words in errors[0], out[-3000:]
    assert "Traceback" not in out


@pytest.mark.slow
def test_a_thousand_classes_of_one_image_train_and_draw_their_figures(tmp_path, data_dir):
    mnist = MNIST(str(data_dir), train=True)
    for i in range(1000):
        (tmp_path / "many" / "train" / f"c{i:04d}").mkdir(parents=True)
        Image.fromarray(mnist.data[i].numpy()).save(tmp_path / "many" / "train" / f"c{i:04d}/a.png")
    where = [f"data.data_dir={tmp_path / 'many'}", f"paths.log_dir={tmp_path / 'outputs'}"]
    proc = cli("train", "data=image_folder", *FAST, *where, cwd=tmp_path)  # hangs: the timeout
    assert "1000 classes, drawn without the counts and class names" in proc.stdout + proc.stderr
    (run,) = (tmp_path / "outputs" / "debug").iterdir()
    names = sorted(p.name for p in (run / "figures").iterdir())
    assert names == ["confusion_matrix.png", "learning_curves.png", "predictions.png"]
