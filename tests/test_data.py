import gzip
import shutil

import numpy as np
import pytest
import torch

from mnist_cnn.data import RAW_FILES, DataError, MNISTDataModule, prepare_mnist


def raw_images(data_dir, name="train-images-idx3-ubyte"):
    """The IDX file read straight from its .gz, independently of torchvision."""
    with gzip.open(data_dir / "MNIST" / "raw" / f"{name}.gz") as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)


def scaled(x):
    return x.float().div(255) if x.dtype == torch.uint8 else x


@pytest.mark.parametrize("loader", ["tensor", "torchvision"])
def test_split_is_the_notebooks(data_dir, loader):
    dm = MNISTDataModule(str(data_dir), loader=loader)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50_000, 10_000, 10_000)
    raw = torch.from_numpy(raw_images(data_dir).copy()).float().div(255)
    test_raw = torch.from_numpy(raw_images(data_dir, "t10k-images-idx3-ubyte").copy())
    assert torch.equal(scaled(dm.val_set[0][0]).squeeze(), raw[0])
    assert torch.equal(scaled(dm.val_set[9_999][0]).squeeze(), raw[9_999])
    assert torch.equal(scaled(dm.train_set[0][0]).squeeze(), raw[10_000])
    assert torch.equal(scaled(dm.test_set[0][0]).squeeze(), test_raw[0].float().div(255))


def test_both_loaders_give_identical_batches(data_dir):
    batches = {}
    for loader in ("tensor", "torchvision"):
        dm = MNISTDataModule(str(data_dir), loader=loader, batch_size=64, seed=7)
        dm.setup("fit")
        train = iter(dm.train_dataloader())
        batches[loader] = [dm.on_after_batch_transfer(next(train), 0) for _ in range(3)]
        batches[loader].append(dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0))
    for (xt, yt), (xv, yv) in zip(batches["tensor"], batches["torchvision"], strict=True):
        assert xt.dtype == xv.dtype == torch.float32 and xt.shape == xv.shape
        assert torch.equal(xt, xv) and torch.equal(yt, yv)
    assert batches["tensor"][0][0].min() >= 0.0 and batches["tensor"][0][0].max() <= 1.0


def test_shuffle_depends_on_seed_and_epoch(data_dir):
    dm = MNISTDataModule(str(data_dir), seed=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = next(iter(loader))[1]
    assert torch.equal(first, next(iter(loader))[1])  # same epoch, same order
    loader.sampler.set_epoch(1)
    assert not torch.equal(first, next(iter(loader))[1])


def copy_raw(data_dir, tmp_path, names=RAW_FILES):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in names:
        shutil.copy(data_dir / "MNIST" / "raw" / f"{name}.gz", raw)
    return raw


def test_offline_gz_files_are_verified_and_extracted(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    assert prepare_mnist(tmp_path) == raw
    assert all((raw / name).stat().st_size == size for name, (_, size, _) in RAW_FILES.items())
    assert not list(raw.glob(".*partial"))
    prepare_mnist(tmp_path)  # idempotent


def test_missing_files_name_the_files_the_folder_and_the_settings(tmp_path):
    with pytest.raises(DataError) as err:
        prepare_mnist(tmp_path)
    message = str(err.value)
    for name in RAW_FILES:
        assert f"{name}.gz" in message
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "data.data_dir" in message and "MNIST_DATA_DIR" in message


def test_corrupt_gz_is_named_and_never_used(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    gz = raw / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:1000])  # truncated
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: MD5"):
        prepare_mnist(tmp_path)
    assert not (raw / "train-labels-idx1-ubyte").exists()
    assert (raw / "train-labels-idx1-ubyte.gz.corrupt").exists()  # kept aside, not deleted


def test_truncated_extracted_file_is_rebuilt_from_gz(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    prepare_mnist(tmp_path)
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    prepare_mnist(tmp_path)
    assert images.stat().st_size == RAW_FILES["t10k-images-idx3-ubyte"][1]


def test_unwritable_data_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # fails for root too, unlike chmod
    with pytest.raises(DataError, match="Cannot write to the data folder"):
        prepare_mnist(blocker / "data")
