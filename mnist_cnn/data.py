"""MNIST as a LightningDataModule with the notebook's split.

Validation is training images 0..9,999, training is 10,000..59,999, test is the
official 10,000. Two loaders give identical batches for the same seed:
``loader="tensor"`` (default) decodes MNIST once into uint8 tensors and indexes
whole batches; ``loader="torchvision"`` is the notebook's per-image PIL path.

>>> dm = MNISTDataModule("data")
>>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
>>> x, y = next(iter(dm.train_dataloader()))  # doctest: +SKIP
"""

import gzip
import hashlib
import logging
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torchvision.datasets import MNIST
from torchvision.transforms import ToTensor

from mnist_cnn.validate import file_in_the_way

log = logging.getLogger(__name__)

# name: (md5 of the .gz, size of the extracted IDX file, IDX magic number)
RAW_FILES = {
    "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", 47_040_016, 2051),
    "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", 60_008, 2049),
    "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", 7_840_016, 2051),
    "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", 10_008, 2049),
}
VAL_SIZE = 10_000


class DataError(RuntimeError):
    """MNIST is missing, damaged or cannot be written; the message says what to do."""


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _idx_problem(path: Path, size: int, magic: int) -> str | None:
    """Why an extracted IDX file is unusable, or None when it is fine."""
    if not path.exists():
        return "missing"
    if path.stat().st_size != size:
        return f"{path.stat().st_size} bytes instead of {size}"
    with path.open("rb") as f:
        found = int.from_bytes(f.read(4), "big")
    return None if found == magic else f"magic number {found} instead of {magic}"


def raw_problems(raw_dir: Path) -> dict[str, str]:
    """Problems of the four ``.gz`` files in ``raw_dir`` by file name (empty when all verify)."""
    problems = {}
    for name, (md5, _, _) in RAW_FILES.items():
        gz = raw_dir / f"{name}.gz"
        if not gz.exists():
            problems[gz.name] = "missing"
        elif _md5(gz) != md5:
            problems[gz.name] = f"MD5 {_md5(gz)} instead of {md5} (truncated or corrupted)"
    return problems


def _missing_data_message(data_dir: Path, problems: dict[str, str], cause: str) -> str:
    raw = data_dir / "MNIST" / "raw"
    listed = "; ".join(f"{name}: {why}" for name, why in problems.items()) or cause
    reason = ([line for line in cause.splitlines() if line.strip()] or ["offline?"])[-1]
    return (
        f"MNIST could not be prepared in {raw} ({listed}); torchvision's download failed "
        f"({reason}). Put the four original files "
        f"{', '.join(n + '.gz' for n in RAW_FILES)} into {raw} (they are verified by MD5 and "
        "extracted there), or point to a folder that holds them in MNIST/raw/ with "
        "`data.data_dir=/path` or the environment variable MNIST_DATA_DIR."
    )


def _cannot_write(data_dir: Path, error: OSError) -> DataError:
    """The error for a data folder that cannot be made or written, naming a file in its way."""
    if blocker := file_in_the_way(data_dir / "MNIST" / "raw"):
        where = "it is" if blocker == data_dir else f"{blocker} is"
        return DataError(
            f"Cannot use the data folder {data_dir}: {where} a file, not a folder. Pass a folder "
            "(it holds MNIST/raw/) with `data.data_dir=/path` or MNIST_DATA_DIR."
        )
    return DataError(
        f"Cannot write to the data folder {data_dir} ({error.strerror}). Make it writable, or "
        "point to another folder with `data.data_dir=/path` or MNIST_DATA_DIR."
    )


def prepare_mnist(data_dir: str | os.PathLike) -> Path:
    """Download or verify and extract MNIST under ``data_dir``; safe for concurrent processes."""
    data_dir = Path(data_dir)
    raw = data_dir / "MNIST" / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(data_dir / "MNIST" / ".prepare.lock"))
        lock.acquire(timeout=600)
    except OSError as e:
        raise _cannot_write(data_dir, e) from None
    try:
        bad = {n: p for n, (_, s, m) in RAW_FILES.items() if (p := _idx_problem(raw / n, s, m))}
        if not bad:
            return raw
        for name in bad:  # a damaged extracted file is removed so it is made again from .gz
            if (raw / name).exists():
                log.warning("rebuilding %s from its .gz (%s)", name, bad[name])
            (raw / name).unlink(missing_ok=True)
        problems = raw_problems(raw)
        for name in problems:  # torchvision would otherwise keep a .gz whose MD5 fails
            if problems[name] != "missing":
                (raw / name).rename(raw / f"{name}.corrupt")
                log.warning("moved %s aside to %s.corrupt (%s)", name, name, problems[name])
        try:
            _extract_all(raw, data_dir)
        except (RuntimeError, OSError) as e:
            damaged = {n: f"{p} (removed)" for n, p in bad.items() if p != "missing"}
            raise DataError(_missing_data_message(data_dir, damaged | problems, str(e))) from None
        if bad := {
            n: p for n, (_, s, m) in RAW_FILES.items() if (p := _idx_problem(raw / n, s, m))
        }:
            raise DataError(_missing_data_message(data_dir, bad, "extraction gave bad files"))
        return raw
    finally:
        lock.release()


def _extract_all(raw: Path, data_dir: Path) -> None:
    """Let torchvision verify (MD5) and extract each file, or download it when online.

    Each file is extracted to a temporary name and renamed, so an interrupted
    extraction never leaves a file that passes as complete.
    """
    missing = [n for n in RAW_FILES if not (raw / f"{n}.gz").exists()]
    if missing:
        MNIST(str(data_dir), download=True)  # fetches the .gz files (and extracts them)
    for name, (md5, _, _) in RAW_FILES.items():
        gz = raw / f"{name}.gz"
        if _idx_problem(raw / name, *RAW_FILES[name][1:]) is None:
            continue
        if _md5(gz) != md5:
            raise RuntimeError(f"{gz.name} fails its MD5 check")
        tmp = raw / f".{name}.partial"
        with gzip.open(gz, "rb") as src, tmp.open("wb") as dst:
            dst.write(src.read())
        tmp.replace(raw / name)


class TensorMNIST(Dataset):
    """uint8 images (N, 1, 28, 28) and int64 labels, indexed a whole batch at a time."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images, self.targets = images.unsqueeze(1), targets

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

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Scale uint8 pixels to [0, 1] on the device, as ``ToTensor`` does per image."""
        x, y = batch
        if x.dtype == torch.uint8:
            x = x.float().div(255)
        return x, y


def copy_from(source: Path, data_dir: Path) -> None:
    """``--from``: copy the four .gz files from ``source`` into ``data_dir/MNIST/raw``, each
    checked by MD5 first (a damaged one is named and nothing is copied)."""
    names = ", ".join(f"{n}.gz" for n in RAW_FILES)
    found = {n: source / f"{n}.gz" for n in RAW_FILES if (source / f"{n}.gz").is_file()}
    if not found:
        what = "is not a folder" if source.exists() else "does not exist"
        what = "holds none of" if source.is_dir() else f"{what}: it should hold"
        raise DataError(
            f"--from {source} {what} the four MNIST files {names}. Pass the folder that holds "
            "them: --from /path/to/folder."
        )
    md5s = {n: _md5(src) for n, src in found.items()}
    if damaged := [
        f"{found[n]}: MD5 {m} instead of {RAW_FILES[n][0]}"
        for n, m in md5s.items()
        if m != RAW_FILES[n][0]
    ]:
        raise DataError(
            f"Damaged in the --from folder (truncated or corrupted): {'; '.join(damaged)}. "
            "Nothing was copied: copy the original file there again, then rerun."
        )
    raw = data_dir / "MNIST" / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for name, src in found.items():
            dst = raw / src.name
            if not (dst.exists() and _md5(dst) == md5s[name]):
                shutil.copyfile(src, dst)
    except OSError as e:
        raise _cannot_write(data_dir, e) from None


def main(argv: list[str] | None = None) -> int:
    """``python -m mnist_cnn.data [--from DIR]``: copy the four .gz files, verify and extract."""
    import argparse
    import sys

    from mnist_cnn import ROOT

    parser = argparse.ArgumentParser(description=main.__doc__)
    default_dir = os.environ.get("MNIST_DATA_DIR", str(ROOT / "data"))
    parser.add_argument("--data-dir", default=default_dir, help=f"default {default_dir}")
    parser.add_argument("--from", dest="source", help="a folder holding the four .gz files")
    args = parser.parse_args(argv)
    try:
        if args.source:
            copy_from(Path(args.source), Path(args.data_dir))
        raw = prepare_mnist(args.data_dir)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"MNIST verified in {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
