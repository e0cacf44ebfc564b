"""MNIST as a LightningDataModule with the notebook's split.

Validation is training images 0..9,999, training is 10,000..59,999, test is the
official 10,000. Two loaders give identical batches for the same seed:
``loader="tensor"`` (default) decodes MNIST once into uint8 tensors and indexes
whole batches; ``loader="torchvision"`` is the notebook's per-image PIL path.

>>> dm = MNISTDataModule("data")
>>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
>>> x, y = next(iter(dm.train_dataloader()))  # doctest: +SKIP
"""

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torchvision.datasets import MNIST
from torchvision.transforms import ToTensor

from mnist_cnn.mnist_files import main, prepare_mnist

log = logging.getLogger(__name__)
VAL_SIZE = 10_000  # the notebook's split: validation is the first 10,000 training images


class TensorMNIST(Dataset):
    """uint8 images (N, C, H, W), given as that or (N, H, W), and int64 labels, indexed a whole
    batch at a time."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images = images.unsqueeze(1) if images.dim() == 3 else images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx, device=self.images.device)
        return self.images[idx], self.targets[idx]


def _as_batch(batch):
    return batch


class EpochSampler(RandomSampler):
    """A shuffle that depends only on (seed, epoch): resuming at epoch k replays epoch k's order."""

    def __init__(self, data, seed: int):
        super().__init__(data)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=g).tolist())


class ResumableLoader(DataLoader):
    """The training DataLoader, with its place in the epoch in checkpoints: Lightning saves
    ``state_dict()`` with the fit loop and calls ``load_state_dict`` on resume, so a run
    resumed mid-epoch trains on the rest of that epoch's order, as an uninterrupted run would.
    The batches already trained on are fetched again and dropped: 0.06 s for a whole epoch of
    the tensor loader here, 2.5 s for torchvision's."""

    _resume: dict | None = None
    _place: dict | None = None

    def state_dict(self) -> dict:
        return dict(self._place or {"epoch": 0, "batches": 0})

    def load_state_dict(self, state: dict) -> None:
        self._resume = state

    def __iter__(self):
        # a generator: this runs at the first batch, after Lightning's set_epoch
        resume, self._resume = self._resume or {}, None
        # EpochSampler or DDP's DistributedSampler; without an epoch (debug=overfit's sequential
        # sampler) a state cannot tell its epoch from the next one, and the epoch starts again
        epoch = getattr(self.sampler, "epoch", None)
        skip = resume.get("batches", 0) if epoch is not None and resume.get("epoch") == epoch else 0
        self._place = {"epoch": epoch, "batches": 0}
        # resuming: the uninterrupted run drew the loader's seed from the global RNG at the
        # epoch's start, before the checkpoint; drawing it again would shift dropout's numbers
        with torch.random.fork_rng(devices=[], enabled=bool(skip)):
            batches = super().__iter__()
        for batch in batches:
            self._place["batches"] += 1
            if self._place["batches"] > skip:
                yield batch


class MNISTDataModule(L.LightningDataModule):
    """The notebook's MNIST split with batch size, workers, seed and loader as settings."""

    classes = [str(i) for i in range(10)]  # what the model is told about the data
    channels, image_size, preprocess = 1, 28, "mnist"

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        loader: str = "tensor",
        on_device: bool = False,
        pin_memory: bool = False,
        seed: int = 1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        prepare_mnist(self.hparams.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = self.hparams.data_dir
        raw = prepare_mnist(root)  # a no-op once verified; covers setup() called alone
        log.debug("MNIST from %s", raw)
        train, test = MNIST(root, train=True), MNIST(root, train=False)
        val_idx, train_idx = range(VAL_SIZE), range(VAL_SIZE, len(train))
        if self.hparams.loader == "torchvision":
            train.transform = test.transform = ToTensor()
            self.val_set, self.train_set = Subset(train, val_idx), Subset(train, train_idx)
            self.test_set = test
        elif self.hparams.loader == "tensor":
            device = torch.device("cpu")
            if self.hparams.on_device and self.trainer is not None:
                device = self.trainer.strategy.root_device
            x, y = train.data.to(device), train.targets.to(device)
            self.val_set = TensorMNIST(x[:VAL_SIZE], y[:VAL_SIZE])
            self.train_set = TensorMNIST(x[VAL_SIZE:], y[VAL_SIZE:])
            self.test_set = TensorMNIST(test.data.to(device), test.targets.to(device))
        else:
            raise ValueError(f"data.loader={self.hparams.loader!r}: use 'tensor' or 'torchvision'")

    def _loader(self, data, batch_size: int, sampler=None) -> DataLoader:
        tensor = self.hparams.loader == "tensor"
        workers = 0 if tensor else self.hparams.num_workers
        return (ResumableLoader if sampler is not None else DataLoader)(
            data,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=_as_batch if tensor else None,
            pin_memory=self.hparams.pin_memory and not self.hparams.on_device,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSampler(self.train_set, self.hparams.seed)
        return self._loader(self.train_set, self.hparams.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.hparams.eval_batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Scale uint8 pixels to [0, 1] on the device, as ``ToTensor`` does per image (outside a
        Trainer the loaders yield uint8, which the module's ``forward`` scales the same way)."""
        x, y = batch
        if x.dtype == torch.uint8:
            x = x.float().div(255)
        return x, y


if __name__ == "__main__":  # python -m mnist_cnn.data [--from DIR]
    raise SystemExit(main())
