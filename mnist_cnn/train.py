"""Train the CNN, then test its best checkpoint.

python -m mnist_cnn.train                                  # the defaults, 20 epochs
python -m mnist_cnn.train trainer.max_epochs=1 data.batch_size=128
python -m mnist_cnn.train -m model.optimizer.lr=1e-3,3e-3  # a sweep
python -m mnist_cnn.train resume=true                      # continue the newest run
"""

import logging
import os
import signal
import threading
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

from mnist_cnn import CONFIG_DIR, runinfo
from mnist_cnn.callbacks import FirstValidationCheck, GracefulStop, LastCheckpoint, ResumedOptimizer
from mnist_cnn.checkpoint import (
    Describe,
    check_batch_size,
    check_continuation,
    check_weights,
    load_checkpoint,
)
from mnist_cnn.errors import ConfigError, Interrupted
from mnist_cnn.module import logged_metrics, make_model, module_config, told_by
from mnist_cnn.validate import build, check, check_metrics, failures, run, task

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry with a ``_target_`` in a config group such as ``callbacks``."""
    entries = group.values() if group else []
    return [
        hydra.utils.instantiate(c) for c in entries if isinstance(c, DictConfig) and "_target_" in c
    ]


def _step_aside(cfg: DictConfig) -> None:
    """Defaults that a user's Trainer flag would break give way: Lightning cannot clip the
    gradients of a fused optimizer under mixed precision, so clipping turns fused off."""
    fused = OmegaConf.select(cfg, "model.optimizer.fused", default=None)
    if cfg.trainer.get("gradient_clip_val") and fused:
        log.info("trainer.gradient_clip_val is set: model.optimizer.fused=false")
        cfg.model.optimizer.fused = False


def _sigterm_before_fit(signum, frame):
    raise Interrupted(signal.SIGTERM, None)


def _stop_on_sigterm():
    """SIGTERM while the run is being set up: ``Interrupted`` (exit 143 with a message), not a
    silent kill; returns the handler to restore (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _sigterm_before_fit)


def start(cfg: DictConfig) -> tuple[DictConfig, tuple | None, str | None, dict | None]:
    """A run's start, before anything is built: resume's config (the run's own, with this
    command line over it), the checks, and the one read of the checkpoint to train from
    (``ckpt_path``, or the run's ``last.ckpt`` for ``resume``). The run lock waits until the
    run is built, so that a refused run leaves nothing in its dir."""
    resumed = runinfo.resumed_config(cfg) if cfg.get("resume") else None
    if resumed is not None:
        cfg = resumed[0]
    check(cfg)
    _step_aside(cfg)
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("resume"):
        ckpt_path = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    if not ckpt_path:
        return cfg, resumed, None, None
    state = load_checkpoint(ckpt_path, keep=True)  # missing, damaged or foreign; fit takes it
    check_continuation(state, ckpt_path, cfg.trainer.get("max_epochs"), bool(cfg.get("resume")))
    check_batch_size(state, ckpt_path, OmegaConf.select(cfg, "data.batch_size"))
    return cfg, resumed, ckpt_path, state


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, return the final metrics (``val/acc_best``, ``test/acc``).

    ``resume=true`` continues from ``<paths.output_dir>/checkpoints/last.ckpt`` (Hydra's run dir
    is the resumed run's, ``conf/hydra/default.yaml``). Raises ``ConfigError``, ``DataError``,
    ``CheckpointError``, ``Interrupted`` (Ctrl-C/SIGTERM, last.ckpt saved) or ``Diverged``.
    """
    before = _stop_on_sigterm()  # until fit: Lightning's handling and GracefulStop take over
    try:
        cfg, resumed, ckpt_path, state = start(cfg)
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if cfg.get("threads"):
            torch.set_num_threads(cfg.threads)
        # Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (fork-safe CUDA checks); without a GPU each
        # torch.cuda.is_available() then loads NVML, and the optimizers ask at every step
        if not torch.cuda.is_available():
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
        L.seed_everything(cfg.seed, workers=True)
        datamodule = build("data", lambda: hydra.utils.instantiate(cfg.data), cfg)
        model = build("model", lambda: make_model(cfg, datamodule), cfg)
        described = Describe(module_config(cfg, datamodule), told_by(cfg, datamodule))
        late_check = _check_module(cfg, model)
        if state is not None:
            check_weights(model, state, ckpt_path)  # another model.net or optimizer stops here
        callbacks = build("callbacks", lambda: instantiate_group(cfg.get("callbacks")))
        callbacks = [c for c in callbacks if not _switched_off(c, cfg.trainer)]
        # last.ckpt after every other callback's epoch end (ModelCheckpoint's best, the history)
        callbacks.sort(key=lambda c: isinstance(c, LastCheckpoint))
        # run_info.yaml and a resume's .hydra/ files, once the data and checkpoint are read;
        # resolved here, where Hydra's ${hydra:...} is known (not in ddp_spawn's processes)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        callbacks.append(runinfo.RunRecord(cfg.paths.output_dir, resolved, ckpt_path, resumed))
        callbacks += [described, *late_check]
        if state is not None:  # before LastCheckpoint: a refusal saves nothing
            callbacks.insert(0, ResumedOptimizer())
        loggers = build("logger", lambda: instantiate_group(cfg.get("logger")))
        trainer = build(
            "trainer",
            lambda: hydra.utils.instantiate(
                cfg.trainer, callbacks=callbacks, logger=loggers or False
            ),
        )

        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
            runinfo.lock_run(cfg.paths.output_dir)  # DDP's other ranks share rank 0's dir
        stop = next((c for c in callbacks if isinstance(c, GracefulStop)), None)
    finally:  # Lightning composes its SIGTERM handler with the one it finds
        _restore(signal.SIGTERM, before)
    # Lightning ignores SIGINT after a Ctrl-C it handles (its exit) and restores it in a teardown
    # that may have run already (a Ctrl-C in on_fit_end): a notebook would ignore Ctrl-C after
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # Lightning's own stop between batches (DDP); GracefulStop saved
        saved = stop.checkpoint if stop else None
        raise Interrupted(signal.SIGTERM, saved, trainer.global_step) from None
    except SystemExit:  # Lightning's exit on a Ctrl-C it handles: a second one, or one before
        # GracefulStop listens (the run's setup); nothing is saved
        _restore(signal.SIGINT, sigint)
        saved = str(last) if last.exists() else None
        raise Interrupted(signal.SIGINT, saved, trainer.global_step, aborted=True) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if stop is not None and stop.signum is not None:  # a signal after the last batch: no test
        raise Interrupted(stop.signum, stop.checkpoint, trainer.global_step, metrics=metrics)
    if cfg.get("test"):
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        try:
            # the path, not "best": Lightning warns about "best" with two Checkpoint callbacks
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        except (SIGTERMException, SystemExit) as e:  # complete and saved: a resume tests
            signum = signal.SIGTERM if isinstance(e, SIGTERMException) else signal.SIGINT
            _restore(signal.SIGINT, sigint)
            saved = str(last) if last.exists() else None
            raise Interrupted(signum, saved, trainer.global_step, metrics=metrics) from None
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
        log.info("test accuracy %.4f, test loss %.4f", metrics["test/acc"], metrics["test/loss"])
        if best:
            log.info("best checkpoint: %s", best)
    runinfo.unlock_run(cfg.paths.output_dir)  # complete: nothing more is written there
    return metrics


def _restore(signum: int, handler) -> None:
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signum, handler)


def _check_module(cfg: DictConfig, model: L.LightningModule) -> list[L.Callback]:
    """The contract a LightningModule meets for the tools (README, "Your own LightningModule"),
    checked before the first batch: a ``test_step`` when the run tests, and the metrics the
    config names (``callbacks.model_checkpoint.monitor``; in a sweep, ``optimized_metric``)
    among those it logs. A module that lists them (``logged_metrics()``) is checked now;
    another by its first validation (Lightning's sanity check), through the callback returned."""
    name = type(model).__name__
    if cfg.get("test") and not is_overridden("test_step", model):
        raise ConfigError(
            f"The module {name} has no test_step, which the test after fit and "
            "python -m mnist_cnn.eval run: add one that logs test/loss (and test/<metric>) "
            "with self.log, or pass test=false."
        )
    keys = ["callbacks.model_checkpoint.monitor", "tune.monitor"]
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        keys.append("optimized_metric")
    if logged := logged_metrics(model):
        check_metrics(cfg, logged)
        return []
    return [FirstValidationCheck(lambda names: check_metrics(cfg, names, keys, name))]


def _switched_off(callback: L.Callback, trainer: DictConfig) -> bool:
    """``trainer.enable_checkpointing=false`` (and the progress bar's and model summary's
    switches) drop our callbacks of that kind, as Lightning drops its own defaults."""
    kinds = {
        "enable_checkpointing": L.pytorch.callbacks.Checkpoint,
        "enable_progress_bar": L.pytorch.callbacks.ProgressBar,
        "enable_model_summary": L.pytorch.callbacks.ModelSummary,
    }
    return any(trainer.get(k) is False and isinstance(callback, t) for k, t in kinds.items())


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
@task
def main(cfg: DictConfig) -> float | None:
    with failures(cfg):  # an error as one line and an exit status; in a sweep, a failed job
        return train(cfg).get(cfg.get("optimized_metric"))


def cli() -> None:
    """The ``mnist-train`` command (the same as ``python -m mnist_cnn.train``)."""
    run(main)


if __name__ == "__main__":
    cli()
