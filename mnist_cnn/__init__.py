"""mnist_cnn: the classic MNIST CNN notebook as a Lightning + Hydra template."""

import secrets
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "conf"
RUN_ID = secrets.token_hex(3)  # one per process: two runs in the same second get two dirs

OmegaConf.register_new_resolver("repo_root", lambda: str(ROOT), replace=True)
OmegaConf.register_new_resolver("run_id", lambda: RUN_ID, replace=True)
