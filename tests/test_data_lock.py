"""Several processes (DDP ranks, parallel sweep jobs) preparing one empty data dir at once."""

import gzip
import multiprocessing as mp
import shutil

from torchvision.datasets import MNIST

from mnist_cnn.data import RAW_FILES, _idx_problem, prepare_mnist, raw_problems


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
    ctx.set_forkserver_preload(["mnist_cnn.data", "torchvision.datasets"])
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_prepare, args=(barrier, str(tmp_path))) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]

    assert raw_problems(raw) == {}
    assert {n: _idx_problem(raw / n, s, m) for n, (_, s, m) in RAW_FILES.items()} == dict.fromkeys(
        RAW_FILES
    )
    assert not list(raw.glob(".*.partial"))  # no temporary file left behind
    for name in RAW_FILES:  # byte-identical to the .gz contents
        assert (raw / name).read_bytes() == gzip.decompress((raw / f"{name}.gz").read_bytes())
