"""Test a checkpoint: loss and its metrics on the test split of the data it was trained on.

python -m mnist_cnn.eval ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt
python -m mnist_cnn.eval ckpt_path=... trainer.accelerator=cpu data.eval_batch_size=500
"""

import logging
import sys

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from mnist_cnn.checkpoint import load_model
from mnist_cnn.errors import CheckpointError, ConfigError, DataError
from mnist_cnn.module import checked_target
from mnist_cnn.validate import check, run, task

log = logging.getLogger(__name__)


def data_config(cfg: DictConfig, saved: dict | None) -> tuple[DictConfig, str]:
    """The data to test on: the checkpoint's own datamodule (``saved``) with this command line's
    ``data.*`` values over it, or ``cfg.data`` when the command line picks ``data=<option>`` or
    the checkpoint names no datamodule; and which it is, in words."""
    given = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    parsed = OverridesParser.create().parse_overrides(list(given))
    if not saved or any(o.key_or_group == "data" for o in parsed):
        return cfg.data, "the data config of this command"
    checked_target(saved, L.LightningDataModule, "the checkpoint's datamodule")
    data = OmegaConf.create(saved)
    for o in parsed:
        if o.key_or_group.startswith("data."):
            OmegaConf.update(data, o.key_or_group[5:], o.value(), force_add=True)
    return data, "the data the checkpoint was trained on; data=<option> picks another"


def _shown(names) -> str:
    return ", ".join(list(names)[:12]) + (", ..." if len(names) > 12 else "")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """``{"test/acc": ..., "test/loss": ...}`` of the checkpoint ``cfg.ckpt_path``."""
    if not cfg.get("ckpt_path"):
        raise ConfigError(
            "ckpt_path is required: python -m mnist_cnn.eval "
            "ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt"
        )
    check(cfg)
    model = load_model(cfg.ckpt_path)
    data, source = data_config(cfg, model.hparams.get("datamodule"))
    log.info("testing on %s (%s)", data.get("_target_"), source)
    datamodule = hydra.utils.instantiate(data)
    classes = [str(c) for c in getattr(datamodule, "classes", model.hparams.classes)]
    if classes != list(model.hparams.classes):  # every label would be scored against another
        raise DataError(
            f"The data's classes ({_shown(classes)}) are not the checkpoint's "
            f"({_shown(model.hparams.classes)}), in name or order, so every score would "
            "compare other classes. Test on data whose class folders carry the checkpoint's "
            "names, or use python -m mnist_cnn.predict on the images."
        )
    trainer = hydra.utils.instantiate(
        cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False
    )
    (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in metrics.items()}


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@task
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
    run(main)
