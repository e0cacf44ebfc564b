"""Your own images as a LightningDataModule: one sub-folder per class, as torchvision's
``ImageFolder`` reads them.

    my_data/train/<class>/*.png   (required)
    my_data/val/<class>/*.png     (optional: else a seeded val_fraction of train/)
    my_data/test/<class>/*.png    (optional: else a seeded test_fraction of train/)

Images are read as ``predict`` reads them (``images.open_image``), converted to grayscale or RGB
(``channels``), resized to ``image_size`` and decoded once into memory; batches are uint8 and the
Trainer scales them to [0, 1] on the device. The folder is only read. No symbolic link is
followed and hidden entries (names starting with ".": ``.ipynb_checkpoints/``, ``._x.png``) are
skipped; an unreadable image is skipped with a warning naming it (``bad_images=skip``) or stops
the run (``bad_images=error``). Fewer than two classes, an empty class folder or a class name
that cannot be written stop the run before training, naming the folder (``DataError``).

python -m mnist_cnn.train data=image_folder data.data_dir=/path/to/my_data

>>> dm = ImageFolderDataModule("my_data", channels=3, image_size=32)  # doctest: +SKIP
>>> dm.classes  # doctest: +SKIP
['cat', 'dog']
"""

import logging
import os
import unicodedata
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

from mnist_cnn.data import MNISTDataModule, TensorMNIST
from mnist_cnn.errors import DataError, ImageError
from mnist_cnn.images import open_image

log = logging.getLogger(__name__)

BAD_IMAGES = ("skip", "error")
LOOKED_FOR = f"looked for {', '.join(IMG_EXTENSIONS)} files"


def _shown(path: str) -> str:
    """``path`` printable, a name that is not UTF-8 included (its bytes as \\x escapes)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _unwritable(name: str) -> str | None:
    """Why a class name cannot be written to checkpoints, logs and figures, or None."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "holds a control character (a newline, a tab, ...)"
    return None


class SafeImageFolder(ImageFolder):
    """torchvision's ``ImageFolder`` that follows no symbolic link and skips hidden entries
    (its own walk follows every link: a link loop, or a link to another class or out of the
    dataset, would be read as images of this class). Its ``samples`` are paths; a class folder
    with no image, or a class name that cannot be written, is a ``DataError`` naming it."""

    def __init__(self, root: str):
        self.links: list[str] = []  # symbolic links not followed
        self.hidden = 0
        super().__init__(root, loader=str)

    def _keep(self, folder: str, name: str) -> bool:
        if name.startswith("."):
            self.hidden += 1
            return False
        if os.path.islink(os.path.join(folder, name)):
            self.links.append(os.path.join(folder, name))
            return False
        return True

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        try:
            entries = sorted(os.listdir(directory))
        except OSError as e:
            raise DataError(f"Cannot read {_shown(directory)}: {e.strerror}.") from None
        classes = [
            name
            for name in entries
            if self._keep(directory, name) and os.path.isdir(os.path.join(directory, name))
        ]
        for name in classes:
            why = _unwritable(name)
            if why:
                raise DataError(
                    f"The class folder {_shown(os.path.join(directory, name))} has a name that "
                    f"{why}: rename it (class names are written to checkpoints, logs and figures)."
                )
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, **_):
        samples = []
        for name, index in sorted(class_to_idx.items()):
            folder, found = os.path.join(directory, name), []
            links = len(self.links)

            def unreadable(e: OSError) -> None:
                raise DataError(f"Cannot read {_shown(e.filename)}: {e.strerror}.")

            walked = []
            for root, dirs, files in os.walk(folder, onerror=unreadable):
                dirs[:] = [d for d in dirs if self._keep(root, d)]  # not walked into
                walked.append((root, files))
            # sorted as torchvision's make_dataset sorts, so a split is the same as before
            for root, files in sorted(walked):
                for file in sorted(files):
                    if self._keep(root, file) and has_file_allowed_extension(file, IMG_EXTENSIONS):
                        found.append((os.path.join(root, file), index))
            if not found:
                skipped = len(self.links) - links
                why = f"; {skipped} symbolic links in it were not followed" if skipped else ""
                raise DataError(
                    f"The class folder {_shown(folder)} has no images ({LOOKED_FOR}{why}): "
                    "put its images in it, or remove the folder."
                )
            samples += found
        return samples


class ImageFolderDataModule(MNISTDataModule):
    """Class folders under ``data_dir``/train (and val/, test/ when present)."""

    def __init__(
        self,
        data_dir: str = "my_data",
        channels: int = 1,
        image_size: int = 28,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        on_device: bool = False,
        pin_memory: bool = False,
        seed: int = 1,
        bad_images: str = "skip",
    ):
        super().__init__(
            data_dir, batch_size, eval_batch_size, 0, "tensor", on_device, pin_memory, seed
        )
        self.save_hyperparameters()
        if channels not in (1, 3):
            raise DataError(f"data.channels={channels}: use 1 (grayscale) or 3 (RGB)")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
            raise DataError("data.val_fraction and data.test_fraction must be in [0, 1)")
        if bad_images not in BAD_IMAGES:
            raise DataError(
                f"data.bad_images={bad_images!r}: use skip (a warning names each unreadable "
                "image) or error (the first one stops the run)"
            )
        self.channels, self.image_size, self.preprocess = channels, image_size, "resize"
        self._classes: list[str] | None = None
        self._train: SafeImageFolder | None = None

    def _folder(self, split: str) -> Path:
        return Path(self.hparams.data_dir) / split

    def _list(self, split: str) -> SafeImageFolder:
        """The split's class folders and image paths (nothing decoded yet), checked."""
        folder = SafeImageFolder(str(self._folder(split)))
        if folder.links:
            shown = ", ".join(_shown(p) for p in folder.links[:3])
            more = f" and {len(folder.links) - 3} more" if len(folder.links) > 3 else ""
            log.warning(
                "%s: %d symbolic link(s) not followed (%s%s): copy the files in instead",
                self._folder(split),
                len(folder.links),
                shown,
                more,
            )
        if folder.hidden:
            log.info(
                "%s: %d hidden entries skipped (names starting with '.'): not read",
                self._folder(split),
                folder.hidden,
            )
        return folder

    @property
    def classes(self) -> list[str]:
        """The class names: the sub-folders of ``train/``, sorted."""
        if self._classes is None:
            train = self._folder("train")
            if not train.is_dir():
                raise DataError(
                    f"No folder {train}: data=image_folder needs data.data_dir=<folder> holding "
                    "train/<class>/<images> (and optionally val/ and test/)."
                )
            folder = self._list("train")
            if len(folder.classes) < 2:
                found = f"only {folder.classes[0]!r}" if folder.classes else "none"
                raise DataError(
                    f"{train} needs a sub-folder per class, two or more (found {found}): put "
                    "each class's images in train/<class>/."
                )
            self._train, self._classes = folder, folder.classes
        return self._classes

    def prepare_data(self) -> None:
        self.classes  # noqa: B018  (a clear error before anything else)

    def _read(self, split: str) -> TensorMNIST:
        self.classes  # noqa: B018  (train/ is listed and checked first)
        folder = self._train if split == "train" else self._list(split)
        if folder.classes != self.classes:
            raise DataError(
                f"{self._folder(split)} has classes {folder.classes}, train/ has {self.classes}: "
                "every split needs the same class folders."
            )
        mode = "L" if self.channels == 1 else "RGB"
        size = (self.image_size, self.image_size)
        to_uint8 = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True)])
        images, targets = [], []
        for path, target in folder.samples:
            try:
                image = open_image(path).convert(mode)
            except ImageError as e:
                if self.hparams.bad_images == "error":
                    raise DataError(
                        f"{_shown(path)}: {e.problem}. Fix or remove it, or pass "
                        "data.bad_images=skip to train without the images that cannot be read."
                    ) from None
                log.warning("skipped %s: %s", _shown(path), e.problem)
                continue
            images.append(to_uint8(image))  # decoded once
            targets.append(target)
        left = torch.bincount(
            torch.tensor(targets, dtype=torch.int64), minlength=len(folder.classes)
        )
        if (left == 0).any():
            empty = self._folder(split) / folder.classes[int((left == 0).nonzero()[0])]
            raise DataError(
                f"The class folder {_shown(str(empty))} has no image that can be read (each was "
                "skipped, see the warnings above): fix its images, or remove the folder."
            )
        log.info("%s: %d images, %d classes", self._folder(split), len(targets), len(self.classes))
        return TensorMNIST(torch.stack(images), torch.tensor(targets, dtype=torch.int64))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = self._read("train")
        split = {s: self._read(s) for s in ("val", "test") if self._folder(s).is_dir()}
        order = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(self.hparams.seed)
        )
        taken = 0
        for name, fraction in (
            ("val", self.hparams.val_fraction),
            ("test", self.hparams.test_fraction),
        ):
            if name not in split:
                n = max(1, round(fraction * len(train))) if fraction > 0 else 0
                idx = order[taken : taken + n]
                split[name] = TensorMNIST(train.images[idx], train.targets[idx])
                taken += n
        rest = order[taken:]
        if len(rest) == 0:
            raise DataError(f"No training images left in {self._folder('train')} after the splits.")
        self.train_set = TensorMNIST(train.images[rest], train.targets[rest])
        self.val_set, self.test_set = split["val"], split["test"]
