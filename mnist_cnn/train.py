"""Train the CNN, then test its best checkpoint.

python -m mnist_cnn.train                                  # the defaults, 20 epochs
python -m mnist_cnn.train trainer.max_epochs=1 data.batch_size=128
python -m mnist_cnn.train -m model.optimizer.lr=1e-3,3e-3  # a sweep
"""

import logging
import sys

import hydra
import lightning as L
from omegaconf import DictConfig

from mnist_cnn.checkpoint import CheckpointError
from mnist_cnn.data import DataError

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry with a ``_target_`` in a config group such as ``callbacks``."""
    entries = group.values() if group else []
    return [
        hydra.utils.instantiate(c) for c in entries if isinstance(c, DictConfig) and "_target_" in c
    ]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, return the final metrics (``val/acc_best``, ``test/acc``)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model, _recursive_=False)  # optimizer stays a config
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint else ""
        trainer.test(model, datamodule=datamodule, ckpt_path="best" if best else None)
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
        log.info("test accuracy %.4f, test loss %.4f", metrics["test/acc"], metrics["test/loss"])
        if best:
            log.info("best checkpoint: %s", best)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except (DataError, CheckpointError) as e:
        log.error("%s", e)
        sys.exit(2)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
