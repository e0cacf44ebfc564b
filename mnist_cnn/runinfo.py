"""What a run dir records beside Hydra's ``.hydra/`` (the composed config, with its
interpolations, and the overrides): once per start (a resumed run adds an entry), the command
line, the git commit with a dirty flag, the package versions and the config with every
interpolation resolved (e.g. the precision ``auto`` picked), in ``<run dir>/run_info.yaml``.

>>> record("outputs/runs/<run>")  # doctest: +SKIP
"""

import fcntl
import logging
import os
import platform
import secrets
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import lightning as L
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from mnist_cnn import ROOT, fast_precision
from mnist_cnn.errors import CheckpointError, ConfigError, RunInUse
from mnist_cnn.files import writing

log = logging.getLogger(__name__)
PENDING = ".hydra/pending"  # a resume's Hydra files, until the run starts (hydra_subdir)
PACKAGES = ("mnist_cnn", "torch", "torchvision", "lightning", "torchmetrics", "hydra-core")
PACKAGES += ("omegaconf", "numpy", "tensorboard")


LOCK = ".run.lock"  # held by the process training in the run dir
_held: dict[str, int] = {}  # run dir -> open file descriptor, for the process's life


def run_holder(run_dir: str | Path) -> str | None:
    """Who is training in ``run_dir`` now ("pid 12, python -m ..."), or None when nobody is: the
    lock is an flock, which the OS releases when its process dies, kill -9 included."""
    path = Path(run_dir) / LOCK
    if str(path) in _held or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)


def lock_run(run_dir: str | Path) -> None:
    """Hold ``run_dir``'s lock for this process's life; ``RunInUse`` when another holds it."""
    path = Path(run_dir) / LOCK
    if str(path) in _held:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunInUse(
            f"{run_dir} is in use: {holder} is training in it. Wait for it to finish or stop "
            "it (Ctrl-C saves last.ckpt), then resume; or start a new run (leave out resume)."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}: {info()['command']}".encode(), 0)
    _held[str(path)] = fd


def unlock_run(run_dir: str | Path) -> None:
    """Release ``run_dir``'s lock (its run has ended; a tune worker runs many in one process)."""
    if (fd := _held.pop(str(Path(run_dir) / LOCK), None)) is not None:
        os.close(fd)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict[str, str | None]:
    """Python and the installed versions of the packages a result depends on."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def info(resumed_from: str | None = None, config: dict | None = None) -> dict:
    """This process: when, the command line, the git commit and whether the tree is dirty."""
    status = _git("status", "--porcelain")
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "cwd": str(Path.cwd()),
        "host": platform.node(),
        "git": {
            "commit": _git("rev-parse", "HEAD"),
            "dirty": None if status is None else status != "",
        },
        "versions": versions(),
        "resumed_from": resumed_from,
        "config": config,
    }


@rank_zero_only  # DDP ranks share the run dir; one entry per start
def record(
    run_dir: str | Path, resumed_from: str | None = None, cfg: DictConfig | dict | None = None
) -> Path | None:
    """Append this start, with ``cfg`` resolved, to ``<run_dir>/run_info.yaml`` (a list, oldest
    first); return its path."""
    path = Path(run_dir) / "run_info.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        starts = yaml.safe_load(path.read_text()) if path.is_file() else []
        starts = starts if isinstance(starts, list) else []
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:  # kept aside, never lost
        aside = path.with_name(f"run_info.yaml.unreadable-{os.getpid()}")
        path.replace(aside)
        log.warning("%s is unreadable (%s): moved to %s, a new one begins", path, e, aside.name)
        starts = []
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    starts = [*(starts or []), info(resumed_from, config)]
    with writing(path) as tmp:
        tmp.write_text(yaml.safe_dump(starts, sort_keys=False))
    return path


def _read_yaml(path: Path, fix: str):
    """The file's content; None, with a warning, when it is missing or unreadable (a resume then
    uses this command's config for what the file would have said)."""
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        log.warning("Cannot read %s (%s): %s", path, type(e).__name__, fix)
        return None


def resumed_config(cfg: DictConfig) -> tuple[DictConfig, list[str]]:
    """For ``resume``: the resumed run's own config (``.hydra/config.yaml``) with this command
    line's values applied over it, and the run's overrides followed by this command line's.
    Outside a Hydra run (``train(cfg)`` from Python) ``cfg`` is used as it is."""
    run = Path(cfg.paths.output_dir)
    saved = run / ".hydra" / "config.yaml"
    if not HydraConfig.initialized() or not saved.is_file():
        hydra_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
        if hydra_dir and run.resolve() == Path(hydra_dir).resolve():
            raise ConfigError(  # not tune's trial dirs: those have no .hydra/ of their own
                f"Cannot resume {run}: its settings ({saved}) are missing, so it would go on "
                "with this command's defaults. Start a new run from its checkpoint with the "
                f"settings you want: python -m mnist_cnn.train ckpt_path={run}/checkpoints/"
                "last.ckpt key=value ..."
            )
        return cfg, []
    fix = "resuming with this command's config for it; pass the run's overrides again if needed."
    old_config = _read_yaml(saved, fix)
    if not isinstance(old_config, dict):
        return cfg, []
    old = OmegaConf.create(old_config)
    old_overrides = _read_yaml(run / ".hydra" / "overrides.yaml", fix)
    old_overrides = (
        [o for o in old_overrides if isinstance(o, str)] if isinstance(old_overrides, list) else []
    )
    hydra_file = _read_yaml(run / ".hydra" / "hydra.yaml", fix)
    old_choices = hydra_file.get("hydra", {}) if isinstance(hydra_file, dict) else {}
    old_choices = old_choices.get("runtime", {}).get("choices", {}) or dict(
        HydraConfig.get().runtime.choices
    )
    hydra_cfg = HydraConfig.get()
    given = [o for o in hydra_cfg.overrides.task]
    parser = OverridesParser.create()
    choices = hydra_cfg.runtime.choices
    for o in parser.parse_overrides(given):
        key = o.key_or_group
        if key in ("resume", "ckpt_path") or key.startswith("hydra"):
            continue
        if key in choices or key.lstrip("+~") in choices:  # a config group
            group = key.lstrip("+~")
            if str(old_choices.get(group)) != str(choices.get(group)):
                raise ConfigError(
                    f"Cannot resume {run} with {o.input_line}: it was trained with "
                    f"{group}={old_choices.get(group)}, and a resume keeps the run's groups. "
                    f"Start a new run from its checkpoint instead: ckpt_path={run}/checkpoints/"
                    "last.ckpt " + o.input_line
                )
            continue
        with open_dict(old):
            if o.is_delete():
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(old, parent) if parent else old
                if isinstance(node, DictConfig):
                    node.pop(leaf, None)
            else:
                OmegaConf.update(old, key, o.value(), force_add=True)
    with open_dict(old):
        old.resume, old.paths = cfg.resume, cfg.paths
    keys = {o.key_or_group for o in parser.parse_overrides(given)}
    kept = []
    for line in old_overrides:
        try:
            if parser.parse_override(line).key_or_group not in keys:
                kept.append(line)
        except Exception:  # a damaged line of the record: kept as it was
            kept.append(line)
    return old, [*kept, *given]


@rank_zero_only
def write_resumed_files(run_dir: str | Path, cfg: DictConfig, overrides: list[str]) -> None:
    """A resume that starts: its effective config and overrides become the run's record."""
    pending, hydra_dir = Path(run_dir) / PENDING, Path(run_dir) / ".hydra"
    for file in pending.glob("*.yaml"):
        if file.name == "hydra.yaml":
            file.replace(hydra_dir / file.name)
    for name, data in (("config.yaml", OmegaConf.to_yaml(cfg)), ("overrides.yaml", None)):
        text = data if data is not None else yaml.safe_dump(overrides, sort_keys=False)
        with writing(hydra_dir / name, partial=hydra_dir / f".{name}.partial") as tmp:
            tmp.write_text(text)
    for file in pending.glob("*"):
        file.unlink()
    if pending.is_dir():
        pending.rmdir()


class RunRecord(L.Callback):
    """When fit starts (the data read, the checkpoint loaded): ``record`` this start; for a
    resume, make its config and overrides the run's ``.hydra/`` files. ``train`` adds it."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: dict,
        resumed_from: str | None = None,
        resumed: tuple[DictConfig, list[str]] | None = None,
    ):
        self.run_dir, self.cfg, self.resumed_from = str(run_dir), cfg, resumed_from
        self.resumed = resumed

    def on_fit_start(self, trainer, pl_module) -> None:
        record(self.run_dir, self.resumed_from, self.cfg)
        # a sweep job run again in its dir: its earlier failure is no longer its state
        (Path(self.run_dir) / "job_failed.yaml").unlink(missing_ok=True)
        if self.resumed is not None and self.resumed[1]:
            write_resumed_files(self.run_dir, *self.resumed)


RUN_ID = secrets.token_hex(3)  # one per process: two runs in the same second get two dirs
STARTED = datetime.now()
# torchrun calls the node rank GROUP_RANK; the run lock and rank-0 checks read NODE_RANK
if "TORCHELASTIC_RUN_ID" in os.environ and "GROUP_RANK" in os.environ:
    os.environ.setdefault("NODE_RANK", os.environ["GROUP_RANK"])


def run_dir(resume, new_dir: str, log_dir: str) -> str:
    """``hydra.run.dir``: ``new_dir``, or the run that ``resume`` names (``true``: the newest run
    under ``<log_dir>/runs``), so a resume continues in its own dir with one composition. Under
    torchrun every rank, on every node, takes rank 0's, so that all write one run dir."""
    if _torchrun_rank() > 0:
        return _torchrun_shared("run_dir")
    if resume in (False, None, "false"):
        return _torchrun_shared("run_dir", new_dir)
    run = find_run(log_dir, True if resume in (True, "true") else resume).resolve()
    return _torchrun_shared("run_dir", str(run))


def hydra_subdir(resume) -> str | None:
    """``hydra.output_subdir``: a resume's Hydra files wait in ``.hydra/pending`` until the run
    starts (``runinfo.RunRecord``), so a resume that fails leaves the run's record as it was.
    torchrun's ranks > 0 write none: rank 0 writes the run's."""
    if _torchrun_rank() > 0:
        return None
    return ".hydra" if resume in (False, None, "false") else ".hydra/pending"


def _torchrun_rank() -> int:
    """This process's global rank under torchrun; 0 elsewhere (Lightning's own DDP processes
    get their run dir and log name from Lightning)."""
    return int(os.environ.get("RANK", "0")) if "TORCHELASTIC_RUN_ID" in os.environ else 0


def job_name() -> str:
    """``hydra.job.name`` (the log's name): Hydra's, e.g. ``train``; under torchrun, ranks > 0
    log to ``train_ddp_process_<rank>.log`` as Lightning's own DDP processes do."""
    from hydra.core.utils import JobRuntime

    try:
        name = JobRuntime.instance().get("name")
    except KeyError:
        name = "app"
    return f"{name}_ddp_process_{rank}" if (rank := _torchrun_rank()) else name


def run_name() -> str:
    """A new run dir's name: ``<date>_<time>_<id>``, unique per process."""
    return f"{STARTED:%Y-%m-%d_%H-%M-%S}_{RUN_ID}"


def _torchrun_shared(key: str, value: str | None = None) -> str | None:
    """Under torchrun with several processes: rank 0 puts ``value`` in torchrun's own store and
    every other rank, on any node, waits for it; elsewhere ``value`` as it is."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return value
    from datetime import timedelta

    from torch.distributed import TCPStore

    key = f"mnist_cnn/{key}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        store = TCPStore(host, port, is_master=False, timeout=timedelta(minutes=5))
        if _torchrun_rank() == 0:
            store.set(key, value)
            return value
        return store.get(key).decode()  # waits for rank 0
    except Exception as e:  # rank 0 failed before it chose the run dir: its output says why
        raise ConfigError(
            f"Rank {_torchrun_rank()} did not get the run dir from rank 0 through torchrun's "
            f"store at {host}:{port} ({type(e).__name__}); see node 0's output."
        ) from None


def find_run(log_dir: str | Path, run: str | Path | bool = True) -> Path:
    """The run dir to resume: ``run`` itself when it is a path, else the run under
    ``<log_dir>/runs`` whose ``checkpoints/last.ckpt`` was written last.

    >>> find_run("outputs")  # doctest: +SKIP
    PosixPath('outputs/runs/2026-01-01_12-00-00_a1b2c3')
    """
    if run is True:
        lasts = sorted(Path(log_dir).glob("runs/*/checkpoints/last.ckpt"), key=os.path.getmtime)
        idle = [p for p in lasts if run_holder(p.parents[1]) is None]  # never a live run
        if not idle:
            live = f" ({len(lasts)} in use by live processes)" if lasts else ""
            raise CheckpointError(
                f"resume=true found no run with checkpoints/last.ckpt in {log_dir}/runs{live}"
                ". Start a new run (leave out resume), or name the run: resume=outputs/runs/<run>."
            )
        return idle[-1].parents[1]
    run = Path(run)
    if holder := run_holder(run):
        raise CheckpointError(
            f"Cannot resume {run}: {holder} is training in it. Wait for it to finish or stop it "
            "(Ctrl-C saves last.ckpt), then resume."
        )
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise CheckpointError(
            f"Cannot resume {run}: {last} does not exist. Pass a run dir that holds "
            "checkpoints/last.ckpt (resume=outputs/runs/<run>), or resume=true for the newest run."
        )
    return run


# The resolvers conf/ uses (run dirs, the job's name, trainer.precision), registered when this
# module is imported: every command imports it through mnist_cnn.validate.
OmegaConf.register_new_resolver("run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("hydra_subdir", hydra_subdir, replace=True)
OmegaConf.register_new_resolver("fast_precision", fast_precision, replace=True)
OmegaConf.register_new_resolver("repo_root", lambda: str(ROOT), replace=True)
OmegaConf.register_new_resolver("run_id", lambda: RUN_ID, replace=True)
OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("job_name", job_name, replace=True)
