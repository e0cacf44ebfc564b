"""Shared fixtures: the real config tree, the real MNIST files, temporary run dirs."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mnist_cnn import CONFIG_DIR, ROOT
from mnist_cnn.data import RAW_FILES

IN_CI = os.environ.get("CI", "").lower() == "true"
DATA_DIR = Path(os.environ.get("MNIST_DATA_DIR", ROOT / "data"))


def need(condition: bool, why: str) -> None:
    """Skip locally when something is missing; in CI (CI=true) fail instead."""
    if not condition:
        (pytest.fail if IN_CI else pytest.skip)(why)


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


@pytest.fixture
def make_cfg(tmp_path, data_dir):
    """``make_cfg("trainer.max_epochs=2")``: the real config, shrunk to a few CPU batches in tmp."""

    def make(*overrides: str) -> DictConfig:
        base = (
            "debug=fast",
            "trainer.accelerator=cpu",
            f"paths.output_dir={tmp_path}",
            f"paths.log_dir={tmp_path}",
            f"data.data_dir={data_dir}",
            "callbacks.progress_bar.refresh_rate=0",
        )
        return compose_train(*base, *overrides)

    return make
