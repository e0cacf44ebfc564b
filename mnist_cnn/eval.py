"""Test a checkpoint on the official 10,000-image test set: loss and accuracy.

python -m mnist_cnn.eval ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt
python -m mnist_cnn.eval ckpt_path=... trainer.accelerator=cpu data.eval_batch_size=500
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from mnist_cnn.checkpoint import CheckpointError, load_model
from mnist_cnn.data import DataError
from mnist_cnn.validate import ConfigError, check, run_checked

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """``{"test/acc": ..., "test/loss": ...}`` of the checkpoint ``cfg.ckpt_path``."""
    if not cfg.get("ckpt_path"):
        raise ConfigError(
            "ckpt_path is required: python -m mnist_cnn.eval "
            "ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt"
        )
    check(cfg)
    model = load_model(cfg.ckpt_path)
    datamodule = hydra.utils.instantiate(cfg.data)
    trainer = hydra.utils.instantiate(
        cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False
    )
    (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in metrics.items()}


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> dict[str, float]:
    try:
        metrics = evaluate(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        log.error("%s", e)
        sys.exit(2)
    print(f"checkpoint {cfg.ckpt_path}")
    for name in sorted(metrics):
        print(f"{name} {metrics[name]:.6f}")
    return metrics


if __name__ == "__main__":
    run_checked(main, "eval")
