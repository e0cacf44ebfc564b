import gzip
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from mnist_cnn.data import (
    RAW_FILES,
    DataError,
    MNISTDataModule,
    ResumableLoader,
    _idx_problem,
    prepare_mnist,
)


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


def ddp_rank_1(loader: ResumableLoader) -> ResumableLoader:
    """The loader as Lightning remakes it for rank 1 of 2 under DDP."""
    sampler = DistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=1)
    return ResumableLoader(
        loader.dataset, loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn
    )


@pytest.mark.parametrize("loader", ["tensor", "torchvision", "ddp"])
def test_the_train_loader_resumes_mid_epoch_where_it_stopped(data_dir, loader):
    dm = MNISTDataModule(
        str(data_dir), loader="torchvision" if loader == "torchvision" else "tensor", seed=5
    )
    dm.setup("fit")
    remake = ddp_rank_1 if loader == "ddp" else lambda dl: dl
    first = remake(dm.train_dataloader())
    first.sampler.set_epoch(2)
    batches = iter(first)
    whole = [next(batches)[1] for _ in range(5)]
    batches = iter(first)
    for _ in range(3):
        next(batches)
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 3}

    again = remake(dm.train_dataloader())  # a new process: a new loader, the checkpoint's state
    again.load_state_dict(state)
    again.sampler.set_epoch(2)
    rng = torch.get_rng_state()
    rest = iter(again)
    assert torch.equal(next(rest)[1], whole[3]) and torch.equal(next(rest)[1], whole[4])
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG untouched (dropout's)
    assert again.state_dict() == {"epoch": 2, "batches": 5}
    assert len(list(rest)) == len(again) - 5
    assert torch.equal(next(iter(again))[1], whole[0])  # the next pass starts at the beginning


def test_a_resume_state_from_another_epoch_starts_the_epoch_from_its_beginning(data_dir):
    dm = MNISTDataModule(str(data_dir), seed=5)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = next(iter(loader))[1]
    loader.load_state_dict({"epoch": 3, "batches": 10})  # saved at the end of epoch 4
    assert torch.equal(next(iter(loader))[1], first)
    sequential = ResumableLoader(loader.dataset, 64, collate_fn=loader.collate_fn)  # no epoch
    sequential.load_state_dict({"epoch": None, "batches": 10})
    assert torch.equal(next(iter(sequential))[1], loader.dataset.targets[:64])


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


@pytest.mark.parametrize("data, words", [("a_file", ": it is"), ("a_file/data", "/a_file is")])
def test_a_file_in_the_data_dirs_place_is_named(tmp_path, data, words):
    (tmp_path / "a_file").write_text("not a folder")  # fails for root too, unlike chmod
    with pytest.raises(DataError) as err:
        prepare_mnist(tmp_path / data)
    message = str(err.value)
    assert f"{words} a file, not a folder. Pass a folder" in message, message
    assert "data.data_dir=" in message and "writable" not in message


def run_data_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mnist_cnn.data", *args], capture_output=True, text=True, timeout=300
    )


def test_idx_file_with_the_wrong_magic_number_is_rebuilt_from_gz(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    prepare_mnist(tmp_path)
    labels = raw / "train-labels-idx1-ubyte"
    good = labels.read_bytes()
    labels.write_bytes((2051).to_bytes(4, "big") + good[4:])  # right size, images' magic
    prepare_mnist(tmp_path)
    assert labels.read_bytes() == good


def test_idx_file_with_the_wrong_magic_and_no_gz_is_named(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    prepare_mnist(tmp_path)
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.write_bytes(b"\0\0\0\0" + labels.read_bytes()[4:])
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: magic number 0 instead of 2049"):
        prepare_mnist(tmp_path)
    assert not labels.exists()  # never used


def test_corrupted_gz_of_the_right_size_is_caught_by_md5(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    gz = raw / "t10k-images-idx3-ubyte.gz"
    data = bytearray(gz.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    gz.write_bytes(bytes(data))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: MD5"):
        prepare_mnist(tmp_path)
    assert not (raw / "t10k-images-idx3-ubyte").exists()
    assert (raw / "t10k-images-idx3-ubyte.gz.corrupt").read_bytes() == bytes(data)


def test_a_leftover_of_an_interrupted_extraction_never_passes_as_valid(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    name = "train-images-idx3-ubyte"
    with gzip.open(raw / f"{name}.gz") as f:
        (raw / f".{name}.partial").write_bytes(f.read(1_000_000))  # what a kill mid-write leaves
    assert prepare_mnist(tmp_path) == raw
    assert (raw / name).stat().st_size == RAW_FILES[name][1]


def test_kill_9_during_extraction_leaves_nothing_that_passes_as_valid(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn.data", "--data-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None and not list(raw.glob(".*.partial")):
        time.sleep(0.001)
    proc.kill()
    assert proc.wait() == -9  # killed mid-extraction, not finished
    for name, (_, size, magic) in RAW_FILES.items():  # a final name is complete or absent
        assert not (raw / name).exists() or _idx_problem(raw / name, size, magic) is None
    assert prepare_mnist(tmp_path) == raw
    assert all((raw / name).stat().st_size == size for name, (_, size, _) in RAW_FILES.items())


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_data_cli_names_a_damaged_gz_and_the_fix(data_dir, tmp_path, damage):
    raw = copy_raw(data_dir, tmp_path)
    gz = raw / "train-labels-idx1-ubyte.gz"
    data = bytearray(gz.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:
        data[100] ^= 0x01
    gz.write_bytes(bytes(data))
    proc = run_data_cli("--data-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "train-labels-idx1-ubyte.gz: MD5" in proc.stderr and "MNIST_DATA_DIR" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_data_cli_rebuilds_a_damaged_extracted_file(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    prepare_mnist(tmp_path)
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-1])  # one byte short
    proc = run_data_cli("--data-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "rebuilding t10k-images-idx3-ubyte" in proc.stderr
    assert images.stat().st_size == RAW_FILES["t10k-images-idx3-ubyte"][1]


def test_data_cli_says_a_data_dir_that_is_a_file_is_no_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_data_cli("--data-dir", str(blocker))
    assert proc.returncode == 2 and "it is a file, not a folder. Pass a folder" in proc.stderr
    assert "Traceback" not in proc.stderr and "writable" not in proc.stderr


@pytest.mark.parametrize("source", ["missing", "empty", "damaged"])
def test_data_cli_names_a_bad_from_folder_and_copies_nothing(data_dir, tmp_path, source):
    raw = copy_raw(data_dir, tmp_path / "data")  # a complete copy: --from must not damage it
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    src = tmp_path / "from"
    if source != "missing":
        src.mkdir()
    if source == "damaged":
        for name in RAW_FILES:
            shutil.copy(raw / f"{name}.gz", src)
        gz = src / "train-labels-idx1-ubyte.gz"
        gz.write_bytes(gz.read_bytes()[:1000])  # truncated
    proc = run_data_cli("--data-dir", str(tmp_path / "data"), "--from", str(src))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    problem, fix = {
        "missing": (f"--from {src} does not exist", "Pass the folder that holds them"),
        "empty": (f"--from {src} holds none of the four", "Pass the folder that holds them"),
        "damaged": (f"(truncated or corrupted): {src}/train-labels", "copy the original file"),
    }[source]
    assert problem in proc.stderr and fix in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before
