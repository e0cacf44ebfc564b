"""Shared fixtures: the real config tree, the real MNIST files, temporary run dirs."""

import importlib
import os
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
