"""Shared fixtures: the real config tree, the real MNIST files, temporary run dirs."""

import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mnist_cnn import CONFIG_DIR, ROOT
from mnist_cnn.data import RAW_FILES
from mnist_cnn.train import train

IN_CI = os.environ.get("CI", "").lower() == "true"
DATA_DIR = Path(os.environ.get("MNIST_DATA_DIR", ROOT / "data"))


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


def cli(command: str, *args: str, cwd: Path, code: int = 0) -> subprocess.CompletedProcess:
    """``python -m mnist_cnn.<command> *args`` in ``cwd``, as a user runs it; its exit status
    must be ``code``."""
    proc = subprocess.run(
        [sys.executable, "-m", f"mnist_cnn.{command}", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


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


# debug=fast's few batches, spelled out: a debug=fast run goes under debug/, not runs/
FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.accelerator=cpu",
    "callbacks.progress_bar.refresh_rate=0",
]


def tiny_cfg(out: Path, data_dir: Path, *overrides: str) -> DictConfig:
    """The real config shrunk to a few CPU batches (``debug=fast``), writing into ``out``."""
    where = (f"paths.output_dir={out}", f"paths.log_dir={out}", f"data.data_dir={data_dir}")
    return compose_train(*FAST, *where, *overrides)


@pytest.fixture
def make_cfg(tmp_path, data_dir):
    """``make_cfg("trainer.max_epochs=2")``: ``tiny_cfg`` in this test's ``tmp_path``."""

    def make(*overrides: str) -> DictConfig:
        return tiny_cfg(tmp_path, data_dir, *overrides)

    return make


@pytest.fixture(scope="session")
def full_epoch(tmp_path_factory, data_dir):
    """One full epoch on the 50,000 images, then the test set (~50 s on 2 cores), made once
    per session: ``(run dir, metrics)``."""
    out = tmp_path_factory.mktemp("epoch")
    limits = [f"trainer.{k}_batches=null" for k in ("limit_train", "limit_val", "limit_test")]
    return out, train(tiny_cfg(out, data_dir, "trainer.max_epochs=1", *limits))


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
