"""Callbacks beyond Lightning's own: the notebook's one line per epoch, kept as a history;
RNG state in checkpoints (exact resume); Ctrl-C/SIGTERM save and stop; NaN/inf loss stop."""

import logging
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mnist_cnn.errors import ConfigError, Diverged, Interrupted

log = logging.getLogger(__name__)

STAGES = ("train/", "val/")  # the epoch line and history: every metric the module logs


class EpochSummary(L.Callback):
    """Prints ``epoch 3/20 | train loss 0.0412 acc 0.9871 | val loss 0.0390 acc 0.9880 | 12.3s``
    after each epoch and keeps the per-epoch values in ``history`` (saved in checkpoints)."""

    def __init__(self):
        self.history: list[dict[str, float]] = []
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics  # every rank: computing them syncs across ranks
        row = {"epoch": trainer.current_epoch + 1, "seconds": time.perf_counter() - self._start}
        row |= {k: float(v) for k, v in metrics.items() if k.startswith(STAGES) and v.numel() == 1}
        self.history.append(row)
        if not trainer.is_global_zero:
            return
        parts = [f"epoch {row['epoch']}/{trainer.max_epochs}"]
        for stage in ("train", "val"):
            names = [k for k in row if k.startswith(f"{stage}/") and not k.endswith("_best")]
            if names:
                values = " ".join(f"{k.split('/', 1)[1]} {row[k]:.4f}" for k in names)
                parts.append(f"{stage} {values}")
        parts.append(f"{row['seconds']:.1f}s")
        log.info(" | ".join(parts))

    def state_dict(self) -> dict:
        # the epoch's seconds so far: a run resumed mid-epoch adds to them (no epoch start)
        return {"history": self.history, "epoch_seconds": time.perf_counter() - self._start}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self._start = time.perf_counter() - state_dict.get("epoch_seconds", 0.0)


class LastCheckpoint(Checkpoint):
    """The one writer of ``<dirpath>/last.ckpt``: at every epoch's end, when fit ends, every
    ``every_n_seconds`` of training (or every ``every_n_train_steps`` steps), on Ctrl-C/SIGTERM
    (``GracefulStop``) and when an exception stops fit, so a ``kill -9`` loses at most that much.

    Ours, not ``ModelCheckpoint(save_last=True)``: Lightning 2.6 rewrites ``last.ckpt`` only in
    epochs whose monitored metric improved, and its ``save_on_exception`` writes an extra file
    named like a best checkpoint. A ``Checkpoint``: Lightning runs it after the other callbacks
    (``train`` puts it after any ``ModelCheckpoint``), so the file holds their epoch's state.
    """

    def __init__(
        self, dirpath: str, every_n_seconds: float = 60, every_n_train_steps: int | None = None
    ):
        self.dirpath, self.every_n_seconds = str(dirpath), every_n_seconds
        self.every_n_train_steps = every_n_train_steps
        self.path = os.path.join(self.dirpath, "last.ckpt")
        self._saved_step: int | None = None
        self._clock = time.monotonic()

    def save(self, trainer, stopping: bool = False) -> str:
        """Write ``last.ckpt`` now (the full state, to resume); return its path. ``stopping``:
        the save of a stop, which a second Ctrl-C does not interrupt."""
        # a Ctrl-C now would break torch.save mid-file: it is held until the save is done
        main = threading.current_thread() is threading.main_thread()
        held: list[int] = []
        handler = signal.signal(signal.SIGINT, lambda s, f: held.append(s)) if main else None
        try:
            trainer.save_checkpoint(self.path, weights_only=False)
        finally:
            if main:
                signal.signal(signal.SIGINT, handler)
                if held and callable(handler) and not stopping:  # the stop goes on anyway
                    handler(signal.SIGINT, None)
        self._saved_step, self._clock = trainer.global_step, time.monotonic()
        return self.path

    def _due(self, trainer) -> bool:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return False
        return self._saved_step != trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        self._saved_step, self._clock = trainer.global_step, time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_train_steps:
            due = trainer.global_step % self.every_n_train_steps == 0
        else:
            due = time.monotonic() - self._clock >= self.every_n_seconds
            if trainer.world_size > 1:  # every rank saves together (save_checkpoint syncs)
                due = trainer.strategy.broadcast(due)
        if due and self._due(trainer):
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.fast_dev_run and not trainer.sanity_checking:
            self.save(trainer)  # even with no new step: the epoch's end is recorded

    def on_train_end(self, trainer, pl_module) -> None:
        if self._due(trainer):
            self.save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # a signal saves in GracefulStop; a divergence must not save non-finite weights
        if isinstance(exception, Interrupted | Diverged | KeyboardInterrupt | SIGTERMException):
            return
        started = self._saved_step is not None  # a refusal before training saves nothing
        if trainer.state.fn == "fit" and started and self._due(trainer) and trainer.global_step > 0:
            try:
                self.save(trainer)
                log.warning("saved %s (fit stopped by %s)", self.path, type(exception).__name__)
            except Exception:  # the original error is the one to show
                log.warning("could not save %s (fit stopped by an error)", self.path)


class ResumedOptimizer(L.Callback):
    """Training from a checkpoint restores its optimizers (Lightning's rule), which would keep
    the checkpoint's learning rate and other values over the config's in silence. The values
    the optimizers were built with (before the restore) are applied to the restored ones, with a
    log line; with an lr scheduler, whose state follows the old values, a change is refused."""

    NOT_SETTINGS = {"params", "initial_lr", "foreach", "fused", "capturable", "differentiable"}
    SCHEDULED = {"lr", "betas", "momentum"}  # what a scheduler moves as it goes

    def on_fit_start(self, trainer, pl_module) -> None:
        skip = self.NOT_SETTINGS | (self.SCHEDULED if trainer.lr_scheduler_configs else set())
        skip -= {"initial_lr"} if trainer.lr_scheduler_configs else set()
        self.wanted = [
            [{k: v for k, v in g.items() if k not in skip} for g in o.param_groups]
            for o in trainer.optimizers
        ]

    def on_train_start(self, trainer, pl_module) -> None:
        changed = {}
        for optimizer, groups in zip(trainer.optimizers, self.wanted, strict=False):
            for group, wanted in zip(optimizer.param_groups, groups, strict=False):
                for key, value in wanted.items():
                    if key in group and group[key] != value:
                        changed[key] = (group[key], value)
                        group[key] = value
        if not changed:
            return
        said = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        if trainer.lr_scheduler_configs:
            raise ConfigError(  # before LastCheckpoint's on_train_start: nothing is saved
                f"Cannot train from the checkpoint with other optimizer settings ({said}): its lr "
                "scheduler's state follows the checkpoint's values. Leave them as they were, or "
                "start a new run without ckpt_path/resume."
            )
        log.warning("the checkpoint's optimizer takes this run's settings: %s", said)


class RNGState(L.Callback):
    """Saves the global RNG states (torch, CUDA, numpy, Python) in every checkpoint and restores
    them on resume: Lightning does not, and dropout draws from torch's global generator, so a
    resumed run would otherwise drop different units than an uninterrupted one."""

    def state_dict(self) -> dict:
        numpy_state = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in numpy_state],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state_dict["python"]))
        kind, keys, *rest = state_dict["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class FirstValidationCheck(L.Callback):
    """Calls ``check(names)`` with the metric names the module logged in its first validation
    (Lightning's sanity check, before the first training batch), for a module that does not
    list them itself."""

    def __init__(self, check):
        self.check, self.done = check, False

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.done:
            self.done = True
            self.check(sorted(trainer.callback_metrics))


class GracefulStop(L.Callback):
    """Ctrl-C, SIGTERM, SIGHUP or SIGUSR1: finish the current batch, save ``last.ckpt``, raise
    ``Interrupted``. Lightning's teardown restores every signal's handler after fit.

    A signal during validation or at an epoch's end lets them finish (metrics, checkpoints),
    then stops after the next batch. A second Ctrl-C aborts at once (Lightning's own
    KeyboardInterrupt handling, nothing saved). Under DDP, SIGTERM stays with Lightning, which
    forwards it to every rank and stops them together between batches.
    """

    def __init__(self):
        self.signum: int | None = None
        self.checkpoint: str | None = None
        self._listening = False
        self._training = False

    def _listen(self, trainer) -> None:
        # after Lightning sets its handlers (after on_fit_start): its teardown restores the
        # originals, after an exception too. Its SIGTERM handling would stop mid-validation,
        # and a resume from there skips the rest of that validation.
        if self._listening or threading.current_thread() is not threading.main_thread():
            return
        self._listening = True
        signal.signal(signal.SIGINT, self._on_signal)
        if trainer.world_size == 1:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGHUP, self._on_signal)  # the terminal was closed
            # a scheduler's warning before a time limit; under Slurm it is Lightning's requeue
            if signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL:
                signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signum = signum
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: stopping after this batch (press again to abort without saving)")
            signal.signal(signal.SIGINT, signal.default_int_handler)
        else:
            log.warning("%s: stopping after this batch", signal.Signals(signum).name)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._listening = False

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._listen(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._listen(trainer)
        self._training = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm and self.signum is None:
            self.signum = signal.SIGTERM
        if self.signum is not None:
            self.checkpoint = self._save(trainer)
            raise Interrupted(self.signum, self.checkpoint, trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.signum is not None and self.checkpoint is None:  # came after the last batch
            self.checkpoint = self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # under DDP Lightning raises SIGTERMException between batches: save there too
        if isinstance(exception, SIGTERMException) and self._training:
            self.signum = signal.SIGTERM
            self.checkpoint = self._save(trainer)

    def _save(self, trainer) -> str | None:
        last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        return last.save(trainer, stopping=True) if last is not None else None


class FiniteCheck(L.Callback):
    """Stops with ``Diverged`` when the training loss is NaN or infinite, and refuses to save
    non-finite weights, so the last checkpoint on disk is the last good one.

    On the CPU the loss is checked at every step. On a GPU reading it is a host-device sync
    that stalls the queue of kernels, so it is read every ``gpu_every_n_steps`` steps: NaN
    weights stay NaN, so a later step shows it, and checkpoints are checked before saving.
    """

    def __init__(self, gpu_every_n_steps: int = 50):
        self.gpu_every_n_steps = gpu_every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or (loss.device.type != "cpu" and batch_idx % self.gpu_every_n_steps):
            return
        value = loss.item()  # 10 us here; a torch op on the loss costs 100 us after a step
        if not math.isfinite(value):
            raise Diverged(self._message(trainer, pl_module, f"the training loss is {value}"))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        bad = [n for n, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise Diverged(self._message(trainer, pl_module, f"weights {bad[0]} are not finite"))

    @staticmethod
    def _message(trainer, pl_module, problem: str) -> str:
        optimizer = pl_module.hparams.get("optimizer") or {}
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        saved = folder is not None and any(Path(folder).glob("*.ckpt"))
        kept = (
            f"so the newest checkpoint in {folder} is the last good one"
            if saved
            else "and no checkpoint had been saved yet"
        )
        return (
            f"Training diverged at epoch {trainer.current_epoch + 1}, step {trainer.global_step}: "
            f"{problem}. Nothing was saved after this point, {kept}. Lower the learning rate "
            f"(model.optimizer.lr={optimizer.get('lr')}) or add a scheduler, then start again"
            f"{' or resume from that checkpoint' if saved else ''}."
        )
