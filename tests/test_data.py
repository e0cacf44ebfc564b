import ctypes
import gzip
import os
import resource
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from conftest import cli, need, spawn
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torchvision.datasets import MNIST

from mnist_cnn.data import MNISTDataModule, ResumableLoader
from mnist_cnn.errors import DataError
from mnist_cnn.mnist_files import RAW_FILES, _idx_problem, prepare_mnist


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


@pytest.mark.slow
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


@pytest.fixture
def offline(monkeypatch):
    """MNIST's mirrors refuse connections at once (a closed local port), as when offline."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{port}/"])


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


def test_missing_files_name_the_files_the_folder_and_the_settings(tmp_path, offline):
    with pytest.raises(DataError) as err:
        prepare_mnist(tmp_path)
    message = str(err.value)
    for name in RAW_FILES:
        assert f"{name}.gz" in message
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "data.data_dir" in message and "MNIST_DATA_DIR" in message


def test_corrupt_gz_is_named_and_never_used(data_dir, tmp_path, offline):
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


def test_idx_file_with_the_wrong_magic_number_is_rebuilt_from_gz(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    prepare_mnist(tmp_path)
    labels = raw / "train-labels-idx1-ubyte"
    good = labels.read_bytes()
    labels.write_bytes((2051).to_bytes(4, "big") + good[4:])  # right size, images' magic
    prepare_mnist(tmp_path)
    assert labels.read_bytes() == good


def test_idx_file_with_the_wrong_magic_and_no_gz_is_named(data_dir, tmp_path, offline):
    raw = copy_raw(data_dir, tmp_path)
    prepare_mnist(tmp_path)
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.write_bytes(b"\0\0\0\0" + labels.read_bytes()[4:])
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: corrupted: its SHA-256 is not"):
        prepare_mnist(tmp_path)
    assert not labels.exists()  # never used


def test_corrupted_gz_of_the_right_size_is_caught_by_md5(data_dir, tmp_path, offline):
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


@pytest.mark.slow
def test_kill_9_during_extraction_leaves_nothing_that_passes_as_valid(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    out = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = spawn("data", "--data-dir", str(tmp_path), **out)
    while proc.poll() is None and not list(raw.glob(".*.partial")):
        time.sleep(0.001)
    proc.kill()
    assert proc.wait() == -9  # killed mid-extraction, not finished
    for name, (_, size, sha256) in RAW_FILES.items():  # a final name is complete or absent
        assert not (raw / name).exists() or _idx_problem(raw / name, size, sha256) is None
    assert prepare_mnist(tmp_path) == raw
    assert all((raw / name).stat().st_size == size for name, (_, size, _) in RAW_FILES.items())


@pytest.mark.slow
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
    proc = cli("data", "--data-dir", str(tmp_path), code=2, timeout=300)
    assert "train-labels-idx1-ubyte.gz: MD5" in proc.stderr and "MNIST_DATA_DIR" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_data_cli_rebuilds_a_damaged_extracted_file(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    prepare_mnist(tmp_path)
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-1])  # one byte short
    proc = cli("data", "--data-dir", str(tmp_path), timeout=300)
    assert "rebuilding t10k-images-idx3-ubyte" in proc.stderr
    assert images.stat().st_size == RAW_FILES["t10k-images-idx3-ubyte"][1]


@pytest.mark.slow
def test_data_cli_says_a_data_dir_that_is_a_file_is_no_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = cli("data", "--data-dir", str(blocker), code=2, timeout=300)
    assert "it is a file, not a folder. Pass a folder" in proc.stderr
    assert "Traceback" not in proc.stderr and "writable" not in proc.stderr


@pytest.mark.slow
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
    proc = cli(
        "data", "--data-dir", str(tmp_path / "data"), "--from", str(src), code=2, timeout=300
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    problem, fix = {
        "missing": (f"--from {src} does not exist", "Pass the folder that holds them"),
        "empty": (f"--from {src} holds none of the four", "Pass the folder that holds them"),
        "damaged": (f"(truncated or corrupted): {src}/train-labels", "copy the original file"),
    }[source]
    assert problem in proc.stderr and fix in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before


def leftovers(raw):
    """Temporary files a preparation must never leave behind."""
    return sorted(p.name for p in raw.iterdir() if p.name.endswith((".partial", ".download")))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["labels zeroed", "one pixel flipped"])
def test_an_extracted_file_corrupted_at_the_same_size_is_rebuilt(data_dir, tmp_path, damage):
    raw = copy_raw(data_dir, tmp_path)
    prepare_mnist(tmp_path)
    name = "train-labels-idx1-ubyte" if damage == "labels zeroed" else "train-images-idx3-ubyte"
    good = (raw / name).read_bytes()
    bad = good[:8] + bytes(len(good) - 8) if damage == "labels zeroed" else bytearray(good)
    if damage == "one pixel flipped":
        bad[len(bad) // 2] ^= 0xFF
    (raw / name).write_bytes(bytes(bad))  # the same size and magic number: only content differs
    proc = cli("data", "--data-dir", str(tmp_path), timeout=300)
    assert f"rebuilding {name} from its .gz (corrupted: its SHA-256 is not MNIST's)" in proc.stderr
    assert (raw / name).read_bytes() == good and not leftovers(raw)
    dm = MNISTDataModule(str(tmp_path))
    dm.setup("fit")
    assert len(dm.val_set.targets.unique()) == 10  # the real labels, not the zeroed ones


class HalfFile(BaseHTTPRequestHandler):
    """Serves the first half of the real file, then stops sending (a stalled transfer)."""

    def do_GET(self):
        body = (self.server.raw / self.path.rsplit("/", 1)[-1]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.server.stop.wait(60)

    def log_message(self, *args):
        pass


@pytest.fixture
def stalled_mirrors(data_dir, monkeypatch):
    """Two mirrors on 127.0.0.1: one accepts and never answers, one stalls mid-file."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=16)  # the kernel accepts for it
    half = ThreadingHTTPServer(("127.0.0.1", 0), HalfFile)
    half.raw, half.stop, half.daemon_threads = data_dir / "MNIST" / "raw", threading.Event(), True
    threading.Thread(target=half.serve_forever, daemon=True).start()
    mirrors = [f"http://127.0.0.1:{s.getsockname()[1]}/" for s in (silent, half.socket)]
    monkeypatch.setattr(MNIST, "mirrors", mirrors)
    monkeypatch.setenv("MNIST_DOWNLOAD_TIMEOUT", "1")
    yield mirrors
    half.stop.set()
    half.shutdown()
    half.server_close()
    silent.close()


@pytest.mark.slow
def test_a_stalled_download_times_out_with_the_fix(data_dir, tmp_path, stalled_mirrors):
    missing = "t10k-images-idx3-ubyte"
    raw = copy_raw(data_dir, tmp_path, [n for n in RAW_FILES if n != missing])
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        prepare_mnist(tmp_path)
    message = str(err.value)
    assert time.monotonic() - start < 30
    assert f"{missing}.gz: missing" in message and "\n" not in message
    silent = " nor ".join(stalled_mirrors)
    assert f"the download timed out: no answer from {silent} within 1 s" in message, message
    assert "(MNIST_DOWNLOAD_TIMEOUT)" in message and "--from" in message, message
    assert socket.getdefaulttimeout() is None  # restored
    after = {p.name: p.read_bytes() for p in raw.iterdir() if not p.name.startswith(".prepare")}
    assert after == before  # the good files kept, no half-downloaded file nor temporary folder


@pytest.mark.slow
@pytest.mark.parametrize("step", ["extracting", "copying"])
def test_a_full_disk_is_named_and_leaves_no_partial_file(data_dir, tmp_path, small_disk, step):
    disk, preexec = small_disk
    src = data_dir / "MNIST" / "raw"
    if step == "copying":  # leave less room than the 9.9 MB train-images .gz needs
        args = ["--from", str(src)]
        if preexec is None:
            (disk / "filler").write_bytes(bytes(22 * 2**20))
        else:
            limit = 5 * 2**20
            preexec = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # noqa: E731
    else:
        copy_raw(data_dir, disk)
        args = []
    proc = cli("data", "--data-dir", str(disk), *args, code=2, timeout=300, preexec_fn=preexec)
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"error: No room on the disk for MNIST in {disk} while {step} train-")
    assert "Free some space on that disk, or point to another folder" in line
    raw = disk / "MNIST" / "raw"
    assert not leftovers(raw) and not (raw / "train-images-idx3-ubyte").exists()
    for gz in raw.glob("*.gz"):  # what is there is whole
        assert gz.read_bytes() == (src / gz.name).read_bytes()


def drop_file_permission_override():
    """For root: lose CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH at exec, so modes apply to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(99)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["extracted", "gz", "--from"])
def test_an_unreadable_file_is_named_with_the_fix(data_dir, tmp_path, which):
    raw = copy_raw(data_dir, tmp_path / "data")
    args = ["--data-dir", str(tmp_path / "data")]
    if which == "extracted":
        prepare_mnist(tmp_path / "data")
        unreadable = raw / "t10k-labels-idx1-ubyte"
    elif which == "gz":
        unreadable = raw / "t10k-labels-idx1-ubyte.gz"
    else:
        unreadable = shutil.copytree(raw, tmp_path / "from") / "train-labels-idx1-ubyte.gz"
        args += ["--from", str(tmp_path / "from")]
    unreadable.chmod(0)
    preexec = drop_file_permission_override if os.geteuid() == 0 else None
    proc = cli("data", *args, code=None, timeout=300, preexec_fn=preexec)  # 99: checked below
    need(proc.returncode != 99, "cannot drop root's file permission override (CAP_SETPCAP)")
    unreadable.chmod(0o644)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert f"{unreadable} (Permission denied): make it readable" in line, line
    assert not leftovers(raw)
