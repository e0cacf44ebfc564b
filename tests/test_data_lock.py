"""Several processes (DDP ranks, parallel sweep jobs) preparing one empty data dir at once."""

import gzip
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import cli
from torchvision.datasets import MNIST

from mnist_cnn.mnist_files import RAW_FILES, _idx_problem, prepare_mnist, raw_problems

pytestmark = pytest.mark.slow


def _prepare(barrier, data_dir: str) -> None:
    barrier.wait(timeout=120)  # all four start preparing at the same moment
    prepare_mnist(data_dir)
    MNIST(data_dir, train=True)  # read what was extracted, as setup() does


def test_four_processes_prepare_an_empty_data_dir_at_once(data_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW_FILES:  # offline: only the four .gz files, nothing extracted yet
        shutil.copyfile(data_dir / "MNIST" / "raw" / f"{name}.gz", raw / f"{name}.gz")

    # forkserver: children fork from a clean server that imported mnist_cnn.data once (fast,
    # and safe after this process has used torch's threads, unlike a plain fork)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["mnist_cnn.mnist_files", "torchvision.datasets"])
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_prepare, args=(barrier, str(tmp_path))) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]

    assert raw_problems(raw) == {}
    assert {n: _idx_problem(raw / n, s, h) for n, (_, s, h) in RAW_FILES.items()} == dict.fromkeys(
        RAW_FILES
    )
    assert not list(raw.glob(".*.partial"))  # no temporary file left behind
    for name in RAW_FILES:  # byte-identical to the .gz contents
        assert (raw / name).read_bytes() == gzip.decompress((raw / f"{name}.gz").read_bytes())


# a real `python -m mnist_cnn.data` whose download hangs on a server that never answers
STALLED = (
    "import sys; from torchvision.datasets import MNIST; from mnist_cnn.data import main; "
    "MNIST.mirrors = [sys.argv[1]]; sys.exit(main(['--data-dir', sys.argv[2]]))"
)


def test_a_held_lock_names_its_holder_and_the_wait_ends_clearly(data_dir, tmp_path, caplog):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in list(RAW_FILES)[:3]:  # the fourth must be downloaded
        shutil.copyfile(data_dir / "MNIST" / "raw" / f"{name}.gz", raw / f"{name}.gz")
    server = socket.create_server(("127.0.0.1", 0))  # accepts (in the kernel), never answers
    url = f"http://127.0.0.1:{server.getsockname()[1]}/"
    # the holder hangs far longer than the waiter's subprocess timeout: a waiter that waited for
    # it instead of giving up after MNIST_LOCK_TIMEOUT would time out below
    env = {**os.environ, "MNIST_DOWNLOAD_TIMEOUT": "3600"}
    holder = subprocess.Popen([sys.executable, "-c", STALLED, url, str(tmp_path)], env=env)
    try:
        holder_file = tmp_path / "MNIST" / ".prepare.lock.holder"

        def holder_said_who() -> bool:  # the file is made, then written: wait for its contents
            try:
                return json.loads(holder_file.read_text())["pid"] == holder.pid
            except (OSError, ValueError, KeyError):
                return False

        deadline = time.monotonic() + 300
        while not holder_said_who() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert holder_said_who() and holder.poll() is None

        start = time.monotonic()
        waiter = cli(
            "data",
            *("--data-dir", str(tmp_path)),
            env={**os.environ, "MNIST_LOCK_TIMEOUT": "4"},
            code=None,
            timeout=300,
        )
        # its imports (up to ~30 s on a loaded machine), then 4 s: not the holder's hour
        assert time.monotonic() - start < 200
        assert waiter.returncode == 2 and "Traceback" not in waiter.stderr, waiter.stderr
        warning, error = waiter.stderr.splitlines()
        who = f"(pid {holder.pid} on {socket.gethostname()}: {sys.executable} -c "
        assert warning.startswith(f"Another process {who}"), warning
        assert f"has been preparing MNIST in {tmp_path} for " in warning
        assert "waiting for it, up to 4 s (MNIST_LOCK_TIMEOUT)" in warning, warning
        assert error.startswith(f"error: Another process {who}"), error
        assert f"has been preparing MNIST in {tmp_path} for " in error
        assert "gave up after waiting 4 s (MNIST_LOCK_TIMEOUT). Wait for it, or stop it" in error
        assert "nothing to delete" in error
        assert holder.poll() is None  # the holder was never disturbed
    finally:
        holder.kill()  # kill -9 mid-download: its holder file and .download/ stay
        holder.wait()
        server.close()

    # a dead holder never blocks: the OS released its lock
    last = "t10k-labels-idx1-ubyte.gz"
    shutil.copyfile(data_dir / "MNIST" / "raw" / last, raw / last)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert prepare_mnist(tmp_path) == raw
    # no wait (a held lock is waited for 5 s before a warning, up to 600 s): extraction only
    assert time.monotonic() - start < 60 and "Another process" not in caplog.text
    assert raw_problems(raw) == {} and not holder_file.exists()
    assert not (raw / ".download").exists()  # the killed download's folder is gone too
