"""Shared fixtures and helpers: the real config tree, the real MNIST files, temporary run dirs,
the CLI runner, live training and serving processes, and awkward image files."""

import contextlib
import importlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from subprocess import PIPE

import numpy as np
import pytest
import torch
from filelock import FileLock
from forkserver import fork
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from torchvision.datasets import MNIST

from mnist_cnn import CONFIG_DIR, ROOT
from mnist_cnn.mnist_files import RAW_FILES
from mnist_cnn.train import train

IN_CI = os.environ.get("CI", "").lower() == "true"
# pytest-xdist's workers share the cores: each worker, and each process it starts, takes its
# share: OpenMP threads that outnumber the cores spin against each other and slow every run.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
DATA_DIR = Path(os.environ.get("MNIST_DATA_DIR", ROOT / "data"))


# the longest modules first: under pytest-xdist the short ones then even out the workers' ends
LONGEST = (
    "test_loggers",
    "test_sweep",
    "test_own_module",
    "test_sweep_launcher",
    "test_tune",
    "test_trainer_flags",
    "test_serve",
    "test_bench",
    "test_multinode",
    "test_eval_predict",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.module.__name__ not in LONGEST)  # stable: modules stay whole


def need(condition: bool, why: str) -> None:
    """Skip locally when something is missing; in CI (CI=true) fail instead."""
    if not condition:
        (pytest.fail if IN_CI else pytest.skip)(why)


def import_or_skip(name: str, why: str):
    """``pytest.importorskip``, except that in CI (CI=true) a missing package fails."""
    if not IN_CI:
        return pytest.importorskip(name, reason=why)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"{why} ({e})", pytrace=False)


def cli(
    command: str,
    *args: str,
    cwd: Path | None = None,
    code: int | None = 0,
    timeout: float = 600,
    preexec_fn=None,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """``python -m mnist_cnn.<command> *args`` in ``cwd`` (default: here), as a user runs it; its
    exit status must be ``code`` (``None``: any, for the caller to check). A ``command`` with a
    dot is a module's full name (``benchmarks.bench``)."""
    argv = [sys.executable, "-m", _module(command), *args]
    if preexec_fn is not None:
        proc = subprocess.run(
            argv, capture_output=True, text=True, cwd=cwd, timeout=timeout, preexec_fn=preexec_fn
        )
    else:
        process = spawn(command, *args, cwd=cwd, env=env, stdout=PIPE, stderr=PIPE, text=True)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        proc = subprocess.CompletedProcess(argv, process.returncode, out, err)
    said = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert code is None or proc.returncode == code, f"exit {proc.returncode}, not {code}:\n{said}"
    return proc


def spawn(command: str, *args: str, cwd=None, env=None, stdout=None, stderr=None, text=False):
    """``python -m mnist_cnn.<command> *args`` started, not waited for (``subprocess.Popen``'s
    arguments). A process of its own, forked by ``forkserver.py`` (torch, Lightning and Hydra
    imported once per session), or with ``CLI_FRESH=1`` a new interpreter."""
    if FRESH:
        argv = [sys.executable, "-m", _module(command), *args]
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text)
    return fork(_forkserver(), _module(command), list(args), cwd, env, stdout, stderr, text)


def _module(command: str) -> str:
    return command if "." in command else f"mnist_cnn.{command}"


FRESH = os.environ.get("CLI_FRESH") == "1"
_server: list[str] = []  # the fork server's socket, once started


def _forkserver() -> str:
    """The socket of ``forkserver.py``, started on first use; it ends with this session."""
    if not _server:
        path = Path(tempfile.mkdtemp(prefix="forkserver-")) / "socket"
        server = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("forkserver.py")), str(path)],
            stdin=subprocess.DEVNULL,
            stdout=PIPE,
        )
        assert server.stdout.readline() == b"ready\n", "the fork server did not start"
        _server.append(str(path))
    return _server[0]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    raw = DATA_DIR / "MNIST" / "raw"
    present = all((raw / f"{n}.gz").exists() or (raw / n).exists() for n in RAW_FILES)
    need(present, f"MNIST is not in {raw}: copy the four .gz files there (README, 'Offline data')")
    return DATA_DIR


def compose_train(*overrides: str, config_name: str = "train") -> DictConfig:
    """Compose the real ``conf/`` tree, as ``python -m mnist_cnn.train`` would."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


# Drawing the three figures takes a quarter of a few-batch run's CPU: runs that do not look at
# them leave them out (those that do use FIGURES, or tiny_cfg(..., figures=True))
NO_FIGURES = "callbacks.figures=null"
# Validation and test batches of 250 images, not 1,000: a few-batch run's evaluation is its most
# costly part (and the most costly by far at trainer.precision=64-true)
SMALL_EVAL = "data.eval_batch_size=250"

# debug=fast's few batches, spelled out: a debug=fast run goes under debug/, not runs/
FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.accelerator=cpu",
    "callbacks.progress_bar.refresh_rate=0",
    SMALL_EVAL,
    NO_FIGURES,
]


FIGURES = [a for a in FAST if a != NO_FIGURES]  # FAST, with the figures drawn


def tiny_cfg(out: Path, data_dir: Path, *overrides: str, figures: bool = False) -> DictConfig:
    """The real config shrunk to a few CPU batches (``debug=fast``), writing into ``out``."""
    where = (f"paths.output_dir={out}", f"paths.log_dir={out}", f"data.data_dir={data_dir}")
    return compose_train(*(FIGURES if figures else FAST), *where, *overrides)


@pytest.fixture
def make_cfg(tmp_path, data_dir):
    """``make_cfg("trainer.max_epochs=2")``: ``tiny_cfg`` in this test's ``tmp_path``."""

    def make(*overrides: str, figures: bool = False) -> DictConfig:
        return tiny_cfg(tmp_path, data_dir, *overrides, figures=figures)

    return make


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's server, run as the ``postgres``
    user when we are root), removed afterwards: ``postgres(name)`` creates database ``name`` and
    returns its ``postgresql+psycopg://`` URL."""
    import glob
    import pwd
    import shutil
    import subprocess
    import tempfile

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or [shutil.which("pg_ctl")]
    need(found[-1] is not None, "no PostgreSQL server: apt-get install postgresql")
    bin_dir = Path(found[-1]).parent
    psycopg = import_or_skip("psycopg", "pip install -e '.[postgres]'")
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="mnist_pg_"))
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            need(False, "no postgres user to run the server as: apt-get install postgresql")
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data, log = base / "data", base / "server.log"

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off"
    pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
    root = f"postgresql://postgres@127.0.0.1:{port}"

    def database(name: str) -> str:
        with psycopg.connect(f"{root}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"

    try:
        yield database
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm():
    """A single-host Slurm cluster (Debian's slurm-wlm and munge, started as root with their
    state in a temp dir, torn down afterwards): the environment that points sbatch at it."""
    import shutil
    import socket
    import subprocess
    import tempfile
    import time

    daemons = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
    missing = [d for d in daemons if not shutil.which(d, path=f"/usr/sbin:{os.environ['PATH']}")]
    need(not missing, f"no {', '.join(missing)}: apt-get install slurm-wlm munge")
    need(os.geteuid() == 0, "slurmd runs as root: run the Slurm tests as root (CI does)")
    base = Path(tempfile.mkdtemp(prefix="mnist_slurm_"))
    base.chmod(0o755)
    munge = base / "munge"
    munge.mkdir(mode=0o711)
    shutil.chown(munge, "munge", "munge")
    socket_path = munge / "munge.socket"
    subprocess.run(
        ["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={socket_path}"]
        + [f"--{k}={munge}/munged.{k.split('-')[0]}" for k in ("log-file", "pid-file", "seed-file")]
        + ["--key-file=/etc/munge/munge.key"],
        check=True,
        timeout=60,
    )
    host = socket.gethostname().split(".")[0]
    (base / "slurm.conf").write_text(
        f"""ClusterName=mnist
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire=5
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )
    env = os.environ | {"SLURM_CONF": str(base / "slurm.conf")}
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([f"/usr/sbin/{daemon}"], check=True, env=env, timeout=60)
    deadline = time.monotonic() + 60
    while (
        "idle"
        not in subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env
        ).stdout
    ):
        assert time.monotonic() < deadline, (base / "slurmctld.log").read_text()[-3000:]
        time.sleep(0.5)
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=60)
        for pid_file in (base / "slurmd.pid", base / "slurmctld.pid", munge / "munged.pid"):
            for _ in range(50):  # each daemon by its own pid
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except (OSError, ValueError):
                    break
                time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)


def val_acc_twice(score_from: Path, model_from: Path, data_dir: Path, n: int = 4000):
    """(the best val/acc that ``score_from``'s ModelCheckpoint recorded, the accuracy of
    ``model_from``'s weights on the first ``n`` validation images computed here), at the run's
    precision: a DDP run's val/acc is over every rank's shard."""
    import torch

    from mnist_cnn import fast_precision
    from mnist_cnn.checkpoint import load_checkpoint, load_model
    from mnist_cnn.data import MNISTDataModule

    callbacks = load_checkpoint(score_from)["callbacks"]
    (score,) = [
        s["best_model_score"]
        for k, s in callbacks.items()
        if k.startswith("ModelCheckpoint") and s.get("best_model_score") is not None
    ]
    dm = MNISTDataModule(str(data_dir))
    dm.setup("fit")
    x, y = dm.on_after_batch_transfer(dm.val_set[torch.arange(n)], 0)
    bf16 = fast_precision("cpu") == "bf16-mixed"  # the runs' trainer.precision
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        correct = load_model(model_from)(x).argmax(-1) == y
    return float(score), correct.float().mean().item()


# ---- training runs as live processes (Popen: for tests that signal, kill or race them) ----


def start(tmp_path: Path, data_dir: Path, *args: str) -> subprocess.Popen:
    """``python -m mnist_cnn.train`` under ``tmp_path``, output in a log file, not waited for."""
    # a resume continues with its run's own settings: no FAST
    log = open(tmp_path / f"out-{time.monotonic_ns()}.txt", "w+")  # noqa: SIM115 (read back)
    fast = [] if any(a.startswith("resume=") for a in args) else FAST
    args = [*fast, f"paths.log_dir={tmp_path}", f"data.data_dir={data_dir}", *args]
    proc = spawn("train", *args, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for a ``start``-ed run: ``(exit status, its output)``."""
    proc.wait(timeout=600)
    proc.log.seek(0)
    return proc.returncode, proc.log.read()


def wait_until(proc: subprocess.Popen, condition, poll: float = 0.01, timeout: float = 600) -> None:
    """Until ``condition()`` holds; fail, never hang, if the run ends or stalls first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail("the run ended too soon:\n" + finish(proc)[1][-3000:])
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"not reached in {timeout} s:\n" + finish(proc)[1][-3000:])
        time.sleep(poll)


def the_run(tmp_path: Path) -> Path:
    """The one run dir under ``tmp_path/runs``."""
    (run,) = (tmp_path / "runs").iterdir()
    return run


def last_ckpt(tmp_path: Path) -> Path:
    """A run's ``last.ckpt`` under ``tmp_path/runs``, or a path that does not exist."""
    runs = list((tmp_path / "runs").glob("*/checkpoints/last.ckpt"))
    return runs[0] if runs else tmp_path / "none"


@pytest.fixture
def small_disk(tmp_path):
    """``(folder, preexec_fn)``: a 30 MB tmpfs (root), else a folder and a 30 MB file size limit."""
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)]
    if shutil.which("mount") and subprocess.run(cmd, capture_output=True).returncode == 0:
        yield disk, None
        subprocess.run(["umount", str(disk)], check=True)
    else:
        limit = 30 * 2**20
        yield disk, lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


# ---- tune ----

TINY = [  # not debug=fast: that one saves no checkpoint
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "callbacks.progress_bar.refresh_rate=0",
    "logger=none",
    SMALL_EVAL,
    NO_FIGURES,
]


def tune_cfg(tmp_path, data_dir, *overrides):
    """The ``tune`` config with ``TINY`` trials and one trial, writing into ``tmp_path``."""
    base = [*TINY, f"paths.log_dir={tmp_path}", f"data.data_dir={data_dir}", "tune.n_trials=1"]
    return compose_train(*base, *overrides, config_name="tune")


# ---- images: user-style files, hostile PNGs, predict's output, a small trained checkpoint ----

# what a camera stores for EXIF Orientation o, given the upright picture (exif_transpose undoes it)
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def photo(digit: np.ndarray) -> Image.Image:
    """An MNIST digit as a phone would photograph it: dark ink on light paper, RGB, large."""
    ink = Image.fromarray(255 - digit).resize((200, 200), Image.BILINEAR)
    paper = Image.new("L", (300, 260), 255)
    paper.paste(ink, (60, 20))
    return Image.fromarray((np.asarray(paper) * 0.85 + 20).astype(np.uint8)).convert("RGB")


def save_jpeg(image: Image.Image, path: Path, orientation: int | None = None) -> Path:
    """``image`` as a JPEG; with ``orientation``, stored as a camera held that way stores it."""
    exif = Image.Exif()
    if orientation:
        image = image.transpose(STORED[orientation]) if orientation in STORED else image
        exif[0x0112] = orientation
    image.save(path, "JPEG", quality=92, exif=exif.tobytes())
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """The PNG signature and an IHDR for an 8-bit grey image of that size."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)


def bomb_png(width: int = 9500, height: int = 9500) -> bytes:
    """A valid black 90-megapixel PNG (just over Pillow's limit, where it only warns) in 90 kB."""
    deflate, row = zlib.compressobj(9), bytes(width + 1)  # filter byte + pixels
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    return _png_header(width, height) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def forged_png() -> bytes:
    """A 1x1 PNG whose header claims 100000 x 100000 pixels (CRC fixed so it parses)."""
    one = _png_chunk(b"IDAT", zlib.compress(b"\x00\x00"))
    return _png_header(100_000, 100_000) + one + _png_chunk(b"IEND", b"")


def parse(stdout: str) -> dict[str, tuple[str, int, float]]:
    """predict's lines ``file  class  index  probability`` by file name."""
    rows = (line.split("\t") for line in stdout.splitlines())
    return {Path(f).name: (name, int(i), float(p)) for f, name, i, p in rows}


def digits_as_png(data_dir: Path, folder: Path, labels: dict[int, str], per_class: int) -> None:
    """Real MNIST training digits written as PNG files in class folders, as a user's data."""
    mnist = MNIST(str(data_dir), train=True)
    for digit, name in labels.items():
        (folder / name).mkdir(parents=True)
        found = (mnist.targets == digit).nonzero().flatten()[:per_class]
        for i in found.tolist():
            Image.fromarray(mnist.data[i].numpy()).save(folder / name / f"{i}.png")


def small_checkpoint(tmp_path_factory, data_dir) -> Path:
    """``last.ckpt`` of a run that reads digits (150 CPU batches, ~95%), trained once a session
    (by the first of pytest-xdist's workers to need it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' common temp dir
    ckpt = root / "small_run" / "checkpoints" / "last.ckpt"
    with FileLock(root / "small_run.lock"):
        if not ckpt.exists():
            train(tiny_cfg(root / "small_run", data_dir, "trainer.limit_train_batches=150"))
    return ckpt


# ---- python -m mnist_cnn.serve as a live server ----


def start_server(ckpt: Path, cwd: Path, *overrides: str) -> tuple[subprocess.Popen, int]:
    """``python -m mnist_cnn.serve`` on a free port, once it checked it can listen there."""
    # the port is free when picked, but another process may take it before the server binds it
    # (and answer /health in its place): then another port is tried
    log = cwd / "serve.log"
    for _ in range(5):
        port = _free_port()
        with log.open("w") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mnist_cnn.serve",
                    f"ckpt_path={ckpt}",
                    f"port={port}",
                    *overrides,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,  # its own process group: nothing is left behind
            )
        deadline = time.monotonic() + 240
        # logged after serve's own check that the port is free, just before it listens
        while f"the drawing page: http://127.0.0.1:{port}/" not in log.read_text():
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        else:
            return proc, port
        if f"port={port}: cannot listen on 127.0.0.1" not in log.read_text():
            pytest.fail(f"the server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    pytest.fail(f"no free port in 5 tries:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def serving(ckpt: Path, cwd: Path, *overrides: str):
    """Yields the URL of a healthy server; then SIGTERM must stop all its processes in 60 s."""
    proc, port = start_server(ckpt, cwd, *overrides)
    log = cwd / "serve.log"
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            stopped = proc.wait(timeout=60) is not None
        except subprocess.TimeoutExpired:
            stopped = False
        leftovers = group_alive(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert stopped and not leftovers, f"SIGTERM left processes running:\n{log.read_text()[-3000:]}"
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    """Until the server at ``url`` answers /health with ok (its workers are ready)."""
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, f"the server exited {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no answer on /health:\n{log.read_text()}"
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url + "/health", timeout=5) as response,
        ):
            if response.read() == b"ok":
                return
        time.sleep(0.5)


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies excluded), after 30 s' grace."""
    # the workers' own shutdown may take a while on a loaded machine
    for _ in range(120):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.25)
    return True


def post(url: str, body: bytes, content_type: str | None = "image/png") -> tuple[int, dict]:
    """(status, JSON answer) of ``POST url/predict``."""
    request = urllib.request.Request(url + "/predict", data=body, method="POST")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
