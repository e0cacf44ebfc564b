"""Your own images as a LightningDataModule: one sub-folder per class, as torchvision's
``ImageFolder`` reads them.

    my_data/train/<class>/*.png   (required)
    my_data/val/<class>/*.png     (optional: else a seeded val_fraction of train/)
    my_data/test/<class>/*.png    (optional: else a seeded test_fraction of train/)

Images are converted to grayscale or RGB (``channels``), resized to ``image_size`` and decoded
once into memory; batches are uint8 and the Trainer scales them to [0, 1] on the device. The
folder is only read.

python -m mnist_cnn.train data=image_folder data.data_dir=/path/to/my_data

>>> dm = ImageFolderDataModule("my_data", channels=3, image_size=32)  # doctest: +SKIP
>>> dm.classes  # doctest: +SKIP
['cat', 'dog']
"""

import logging
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from mnist_cnn.data import DataError, MNISTDataModule, TensorMNIST

log = logging.getLogger(__name__)


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
    ):
        super().__init__(
            data_dir, batch_size, eval_batch_size, 0, "tensor", on_device, pin_memory, seed
        )
        self.save_hyperparameters()
        if channels not in (1, 3):
            raise DataError(f"data.channels={channels}: use 1 (grayscale) or 3 (RGB)")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
            raise DataError("data.val_fraction and data.test_fraction must be in [0, 1)")
        self.channels, self.image_size, self.preprocess = channels, image_size, "resize"
        self._classes: list[str] | None = None

    def _folder(self, split: str) -> Path:
        return Path(self.hparams.data_dir) / split

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
            try:
                self._classes = find_classes(str(train))[0]
            except FileNotFoundError as e:
                raise DataError(f"{e}. Put each class's images in train/<class>/.") from None
        return self._classes

    def prepare_data(self) -> None:
        self.classes  # noqa: B018  (a clear error before anything else)

    def _read(self, split: str) -> TensorMNIST:
        mode = "L" if self.channels == 1 else "RGB"
        size = (self.image_size, self.image_size)
        to_uint8 = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True)])
        folder = ImageFolder(
            str(self._folder(split)), transform=to_uint8, loader=lambda p: _open(p, mode)
        )
        if folder.classes != self.classes:
            raise DataError(
                f"{self._folder(split)} has classes {folder.classes}, train/ has {self.classes}: "
                "every split needs the same class folders."
            )
        images = torch.stack([image for image, _ in folder])  # decoded once
        targets = torch.tensor(folder.targets, dtype=torch.int64)
        log.info("%s: %d images, %d classes", self._folder(split), len(targets), len(self.classes))
        return TensorMNIST(images, targets)

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


def _open(path: str, mode: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert(mode)
