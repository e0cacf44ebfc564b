"""Train the CNN, then test its best checkpoint.

python -m mnist_cnn.train                                  # the defaults, 20 epochs
python -m mnist_cnn.train trainer.max_epochs=1 data.batch_size=128
python -m mnist_cnn.train -m model.optimizer.lr=1e-3,3e-3  # a sweep
python -m mnist_cnn.train resume=true                      # continue the newest run
"""

import errno
import logging
import os
import re
import shlex
import signal
import sys
import threading
from pathlib import Path

import hydra
import lightning as L
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

from mnist_cnn import CONFIG_DIR, runinfo
from mnist_cnn.callbacks import (
    Diverged,
    FirstValidationCheck,
    GracefulStop,
    Interrupted,
    LastCheckpoint,
    ResumedOptimizer,
)
from mnist_cnn.checkpoint import (
    CheckpointError,
    Describe,
    check_batch_size,
    check_continuation,
    check_weights,
    load_checkpoint,
)
from mnist_cnn.errors import ConfigError, DataError, StorageError, in_user_code, unwrap
from mnist_cnn.module import logged_metrics, make_model, module_config, told_by
from mnist_cnn.validate import check, check_metrics, hydra_flags, out_of_memory, run, task

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry with a ``_target_`` in a config group such as ``callbacks``."""
    entries = group.values() if group else []
    return [
        hydra.utils.instantiate(c) for c in entries if isinstance(c, DictConfig) and "_target_" in c
    ]


def build(group: str, make, cfg: DictConfig | None = None):
    """``make()``; an error raised while building the ``group`` config (a bad ``_target_``, an
    argument the class refuses, no GPU for trainer.accelerator=gpu) as a one-line
    ``ConfigError``. An error raised inside the user's own code keeps its traceback."""
    try:
        return make()
    except ConfigError:
        raise
    except Exception as e:  # Hydra wraps the class's own error, which names the problem
        cause = unwrap(e)
        if isinstance(cause, ConfigError | DataError | CheckpointError) or in_user_code(cause):
            raise cause from None  # the user's own bug keeps its traceback, file and line
        targets, wrapper = [], e  # the instantiations it went through, outermost first
        while isinstance(wrapper, InstantiationException):
            if found := re.match(r"Error in call to target '([^']+)'", str(wrapper)):
                targets.append(found[1])
            wrapper = wrapper.__cause__
        words = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
        fix = (
            f"Fix the {group}.* override on the command line or in conf/{group}/ "
            "(python -m mnist_cnn.train --cfg job shows them)."
        )
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", words)
        if targets and unexpected and cfg is not None:
            fix = _unexpected_key(cfg.get(group), group, targets[-1], unexpected[1]) or fix
        where = f" (in {targets[-1]})" if targets else ""
        raise ConfigError(f"Cannot build {group} from the config: {words}{where}. {fix}") from None


def _unexpected_key(node, path: str, target: str, key: str) -> str | None:
    """Where ``key``, refused by ``target``, sits in the config, and how to drop it or replace
    its whole node (Hydra merges ``node={...}`` into the keys already there)."""
    if not isinstance(node, DictConfig):
        return None
    if key in node and "_target_" in node:
        try:
            same = hydra.utils.get_object(node._target_) is hydra.utils.get_object(target)
        except Exception:  # a _target_ that does not import is another error
            same = False
        if same:
            group = path.replace(".", "/")
            return (
                f"{path}.{key} is not one of its arguments: remove it with ~{path}.{key}. To "
                f"replace the whole node, write ~{path} '+{path}={{...}}' (Hydra merges "
                f"{path}={{...}} into the keys already there), or save it as "
                f"conf/{group}/<name>.yaml and pick it with {group}=<name>."
            )
    for child, value in node.items():
        if hint := _unexpected_key(value, f"{path}.{child}", target, key):
            return hint
    return None


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


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, return the final metrics (``val/acc_best``, ``test/acc``).

    ``resume=true`` continues from ``<paths.output_dir>/checkpoints/last.ckpt`` (Hydra's run dir
    is the resumed run's, ``conf/hydra/default.yaml``). Raises ``ConfigError``, ``DataError``,
    ``CheckpointError``, ``Interrupted`` (Ctrl-C/SIGTERM, last.ckpt saved) or ``Diverged``.
    """
    before = _stop_on_sigterm()  # until fit: Lightning's handling and GracefulStop take over
    resumed = runinfo.resumed_config(cfg) if cfg.get("resume") else None
    if resumed is not None:
        cfg = resumed[0]
    check(cfg)
    _step_aside(cfg)
    ckpt_path = cfg.get("ckpt_path")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if cfg.get("resume"):
        ckpt_path = str(last)
    state = load_checkpoint(ckpt_path) if ckpt_path else None  # missing, damaged or foreign
    if state is not None:
        check_continuation(state, ckpt_path, cfg.trainer.get("max_epochs"), bool(cfg.get("resume")))
        check_batch_size(state, ckpt_path, OmegaConf.select(cfg, "data.batch_size"))
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
        lambda: hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False),
    )

    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        runinfo.lock_run(cfg.paths.output_dir)  # DDP's other ranks share rank 0's dir
    stop = next((c for c in callbacks if isinstance(c, GracefulStop)), None)
    if before is not None:  # Lightning composes its SIGTERM handler with the one it finds
        signal.signal(signal.SIGTERM, before)
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


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOENT, errno.EFBIG)
KINDS = {ConfigError: "config", DataError: "data", CheckpointError: "checkpoint"}
KINDS |= {Diverged: "diverged", StorageError: "storage"}


def _storage_error(e: OSError, cfg: DictConfig) -> StorageError:
    where = os.fsdecode(e.filename) if e.filename else cfg.paths.output_dir
    fix = "Free some space or make the folder writable"
    if e.errno == errno.ENOENT:
        fix = "Was the run dir deleted or moved while training? Leave it in place"
    run = Path(cfg.paths.output_dir)
    last = run / "checkpoints" / "last.ckpt"
    again = f"resume={run}"
    if not (run / ".hydra" / "config.yaml").is_file():  # its settings are gone with it
        again = f"ckpt_path={last} with the run's settings"
    kept = f"the last complete checkpoint is kept, and {again} continues from it"
    if not last.is_file():  # the first save failed: there is nothing to continue from
        kept = "no checkpoint was saved yet: run the same command again"
    return StorageError(
        f"Cannot write {where}: {e.strerror or e}. {fix} (or pass paths.log_dir=/another/folder); "
        f"{kept}."
    )


def _thread_write_error(args) -> None:
    """A background writer (TensorBoard's event thread) that cannot write: one line, not a
    traceback; the main thread names the fault when it writes next."""
    e = args.exc_value
    if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
        where = os.fsdecode(e.filename) if e.filename else "a file"
        log.warning("%s could not write %s: %s", args.thread.name, where, e.strerror or e)
    else:
        threading.__excepthook__(args)


def _out_of_memory(cfg: DictConfig) -> ConfigError:
    batch = OmegaConf.select(cfg, "data.batch_size", default="?")
    evals = OmegaConf.select(cfg, "data.eval_batch_size", default="?")
    precision = str(OmegaConf.select(cfg, "trainer.precision", default=""))
    half = "" if "16" in precision else "; trainer.precision=bf16-mixed halves activations"
    return ConfigError(
        f"Out of memory: lower data.batch_size (now {batch}) or data.eval_batch_size (now "
        f"{evals}), or use a smaller model.net{half}."
    )


def _job_failed(cfg: DictConfig, error: Exception) -> None:
    """In a ``-m`` sweep: record the failed job for the sweep report; the other jobs go on."""
    kind = next((k for t, k in KINDS.items() if isinstance(error, t)), "exception")
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if kind == "exception":
        log.exception("the job failed; the sweep goes on with the other jobs")
        line = f"{type(error).__name__}: {line}"
    path = Path(cfg.paths.output_dir) / "job_failed.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"error": line, "kind": kind}, sort_keys=False))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
@task
def main(cfg: DictConfig) -> float | None:
    sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    threading.excepthook = _thread_write_error
    try:
        try:
            metrics = train(cfg)
        except OSError as e:  # ours to name only when the run's files cannot be written
            if e.errno not in WRITE_ERRORS or in_user_code(e):
                raise
            raise _storage_error(e, cfg) from None
        except Exception as e:
            if not out_of_memory(e):
                raise
            raise _out_of_memory(cfg) from None
    except (ConfigError, DataError, CheckpointError, Diverged, StorageError) as e:
        log.error("%s", e)
        if sweep:
            return _job_failed(cfg, e)
        sys.exit(2)
    except Interrupted as e:
        if e.checkpoint:
            again = shlex.join(["python", "-m", "mnist_cnn.train", *hydra_flags("train")])
            log.warning(
                "%s Resume with: %s resume=%s (or resume=true for the newest run), adding "
                "trainer.max_epochs=N to change the length.",
                e,
                again,
                cfg.paths.output_dir,
            )
        else:
            log.warning("%s Training had not started: run the same command again.", e)
        sys.exit(128 + e.signum)
    except Exception as e:  # the user's code: its traceback; in a sweep, the other jobs go on
        if not sweep:
            raise
        return _job_failed(cfg, e)
    return metrics.get(cfg.get("optimized_metric"))


def cli() -> None:
    """The ``mnist-train`` command (the same as ``python -m mnist_cnn.train``)."""
    run(main)


if __name__ == "__main__":
    cli()
