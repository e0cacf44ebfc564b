"""Train the CNN, then test its best checkpoint.

python -m mnist_cnn.train                                  # the defaults, 20 epochs
python -m mnist_cnn.train trainer.max_epochs=1 data.batch_size=128
python -m mnist_cnn.train -m model.optimizer.lr=1e-3,3e-3  # a sweep
python -m mnist_cnn.train resume=true                      # continue the newest run
"""

import logging
import signal
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from mnist_cnn import runinfo
from mnist_cnn.callbacks import Diverged, GracefulStop, Interrupted
from mnist_cnn.checkpoint import (
    CheckpointError,
    check_continuation,
    check_weights,
    load_checkpoint,
)
from mnist_cnn.data import DataError
from mnist_cnn.validate import ConfigError, check, run_checked

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry with a ``_target_`` in a config group such as ``callbacks``."""
    entries = group.values() if group else []
    return [
        hydra.utils.instantiate(c) for c in entries if isinstance(c, DictConfig) and "_target_" in c
    ]


def make_model(cfg: DictConfig) -> L.LightningModule:
    """The module; its optimizer and scheduler stay configs (``configure_optimizers`` builds
    them), so their classes are looked up here, before any work."""
    model = hydra.utils.instantiate(cfg.model, _recursive_=False)
    for part in ("optimizer", "scheduler"):
        if cfg.model.get(part):
            hydra.utils.get_method(cfg.model[part]._target_)
    return model


def build(group: str, make):
    """``make()``, with an error raised while building the ``group`` config (a bad ``_target_``,
    an argument the class refuses, no GPU for trainer.accelerator=gpu) as a ``ConfigError``."""
    try:
        return make()
    except Exception as e:  # Hydra wraps the class's own error, which names the problem
        words = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ConfigError(
            f"Cannot build {group} from the config: {words}. Fix the {group}.* override on the "
            f"command line or in conf/{group}/ (python -m mnist_cnn.train --cfg job shows them)."
        ) from None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, return the final metrics (``val/acc_best``, ``test/acc``).

    ``resume=true`` continues from ``<paths.output_dir>/checkpoints/last.ckpt`` (the command
    line points the run dir at the resumed run). Raises ``ConfigError``, ``DataError``,
    ``CheckpointError``, ``Interrupted`` (Ctrl-C/SIGTERM, last.ckpt saved) or ``Diverged``.
    """
    check(cfg)
    ckpt_path = cfg.get("ckpt_path")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if cfg.get("resume"):
        ckpt_path = str(last)
    state = load_checkpoint(ckpt_path) if ckpt_path else None  # missing, damaged or foreign
    if state is not None:
        check_continuation(state, ckpt_path, cfg.trainer.get("max_epochs"), bool(cfg.get("resume")))
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build("data", lambda: hydra.utils.instantiate(cfg.data))
    model = build("model", lambda: make_model(cfg))
    if state is not None:
        check_weights(model, state, ckpt_path)  # another model.net or optimizer stops here
    callbacks = build("callbacks", lambda: instantiate_group(cfg.get("callbacks")))
    # run_info.yaml and a resume's .hydra/ files, once the data and checkpoint are read
    callbacks.append(runinfo.RunRecord(cfg.paths.output_dir, cfg, ckpt_path))
    loggers = build("logger", lambda: instantiate_group(cfg.get("logger")))
    trainer = build(
        "trainer",
        lambda: hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False),
    )

    stop = next((c for c in callbacks if isinstance(c, GracefulStop)), None)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning's own stop between batches (DDP); GracefulStop saved
        saved = stop.checkpoint if stop else None
        raise Interrupted(signal.SIGTERM, saved, trainer.global_step) from None
    except SystemExit:  # Lightning's exit on a Ctrl-C it handles: a second one, or one before
        # GracefulStop listens (the run's setup); nothing is saved
        saved = str(last) if last.exists() else None
        raise Interrupted(signal.SIGINT, saved, trainer.global_step, aborted=True) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if stop is not None and stop.signum is not None:  # a signal after the last batch: no test
        raise Interrupted(stop.signum, stop.checkpoint, trainer.global_step, metrics=metrics)
    if cfg.get("test"):
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint else ""
        try:
            trainer.test(model, datamodule=datamodule, ckpt_path="best" if best else None)
        except (SIGTERMException, SystemExit) as e:  # complete and saved: a resume tests
            signum = signal.SIGTERM if isinstance(e, SIGTERMException) else signal.SIGINT
            saved = str(last) if last.exists() else None
            raise Interrupted(signum, saved, trainer.global_step, metrics=metrics) from None
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
        log.info("test accuracy %.4f, test loss %.4f", metrics["test/acc"], metrics["test/loss"])
        if best:
            log.info("best checkpoint: %s", best)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except (ConfigError, DataError, CheckpointError, Diverged) as e:
        log.error("%s", e)
        sys.exit(2)
    except Interrupted as e:
        if e.checkpoint:
            log.warning(
                "%s Resume with: python -m mnist_cnn.train resume=%s (or resume=true for the "
                "newest run), adding trainer.max_epochs=N to change the length.",
                e,
                cfg.paths.output_dir,
            )
        else:
            log.warning("%s Training had not started: run the same command again.", e)
        sys.exit(128 + e.signum)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    run_checked(main, "train")
