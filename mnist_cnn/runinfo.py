"""What a run dir records beside Hydra's ``.hydra/`` (the composed config, with its
interpolations, and the overrides): once per start (a resumed run adds an entry), the command
line, the git commit with a dirty flag, the package versions and the config with every
interpolation resolved (e.g. the precision ``auto`` picked), in ``<run dir>/run_info.yaml``.

>>> record("outputs/runs/<run>")  # doctest: +SKIP
"""

import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mnist_cnn import ROOT

PENDING = ".hydra/pending"  # a resume's Hydra files, until the run starts (validate.preflight)
PACKAGES = ("mnist_cnn", "torch", "torchvision", "lightning", "torchmetrics", "hydra-core")
PACKAGES += ("omegaconf", "numpy", "tensorboard")


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
    run_dir: str | Path, resumed_from: str | None = None, cfg: DictConfig | None = None
) -> Path | None:
    """Append this start, with ``cfg`` resolved, to ``<run_dir>/run_info.yaml`` (a list, oldest
    first); return its path."""
    path = Path(run_dir) / "run_info.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    starts = yaml.safe_load(path.read_text()) if path.is_file() else []
    config = None if cfg is None else OmegaConf.to_container(cfg, resolve=True)
    starts = [*(starts or []), info(resumed_from, config)]
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(yaml.safe_dump(starts, sort_keys=False))
    tmp.replace(path)
    return path


@rank_zero_only
def commit_hydra_files(run_dir: str | Path) -> None:
    """Move a resume's ``.hydra/pending/*.yaml`` over ``.hydra/*.yaml`` once the run starts, so a
    resume that fails its checks leaves the run's config and overrides as they were."""
    pending = Path(run_dir) / PENDING
    for file in pending.glob("*.yaml"):
        file.replace(pending.parent / file.name)
    if pending.is_dir():
        pending.rmdir()


class RunRecord(L.Callback):
    """When fit starts (the data read, the checkpoint loaded): ``record`` this start and
    ``commit_hydra_files``. ``train`` adds it to every run."""

    def __init__(self, run_dir: str | Path, cfg: DictConfig, resumed_from: str | None = None):
        self.run_dir, self.cfg, self.resumed_from = run_dir, cfg, resumed_from

    def on_fit_start(self, trainer, pl_module) -> None:
        record(self.run_dir, self.resumed_from, self.cfg)
        commit_hydra_files(self.run_dir)
