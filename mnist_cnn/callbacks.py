"""Callbacks beyond Lightning's own: the notebook's one line per epoch, kept as a history;
RNG state in checkpoints (exact resume); Ctrl-C/SIGTERM save and stop; NaN/inf loss stop."""

import logging
import math
import os
import random
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

KEYS = ("train/loss", "train/acc", "val/loss", "val/acc")


class EpochSummary(L.Callback):
    """Prints ``epoch 3/20 | train loss 0.0412 acc 0.9871 | val loss 0.0390 acc 0.9880 | 12.3s``
    after each epoch and keeps the per-epoch values in ``history`` (saved in checkpoints)."""

    def __init__(self):
        self.history: list[dict[str, float]] = []
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    @rank_zero_only
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1, "seconds": time.perf_counter() - self._start}
        row |= {k: float(metrics[k]) for k in KEYS if k in metrics}
        self.history.append(row)
        parts = [f"epoch {row['epoch']}/{trainer.max_epochs}"]
        for stage in ("train", "val"):
            if f"{stage}/loss" in row:
                parts.append(
                    f"{stage} loss {row[f'{stage}/loss']:.4f} acc {row[f'{stage}/acc']:.4f}"
                )
        parts.append(f"{row['seconds']:.1f}s")
        log.info(" | ".join(parts))

    def state_dict(self) -> dict:
        # the epoch's seconds so far: a run resumed mid-epoch adds to them (no epoch start)
        return {"history": self.history, "epoch_seconds": time.perf_counter() - self._start}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self._start = time.perf_counter() - state_dict.get("epoch_seconds", 0.0)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` writing only ``last.ckpt`` during training: every
    ``every_n_seconds`` of training (Lightning's ``train_time_interval``), or every
    ``every_n_train_steps`` steps when that is set, so a ``kill -9`` loses at most that much.
    Unlike the base class it does not also save when training ends (it would replace the main
    callback's epoch-end ``last.ckpt``)."""

    def __init__(
        self, dirpath: str, every_n_seconds: float = 60, every_n_train_steps: int | None = None
    ):
        interval = None if every_n_train_steps else timedelta(seconds=every_n_seconds)
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=interval,
            save_top_k=0,
            save_last=True,
            enable_version_counter=False,
        )

    def on_train_end(self, trainer, pl_module) -> None:
        """Nothing: the main checkpoint callback has saved ``last.ckpt`` at the epoch's end."""


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


class Interrupted(Exception):
    """Training was stopped by Ctrl-C or SIGTERM after saving ``checkpoint``; ``aborted``: by a
    Ctrl-C that Lightning handled (a second one, or one before training started), without
    saving (``checkpoint``: the newest one from before). ``metrics``: the fit's, when the signal
    came after its last batch (training is complete)."""

    def __init__(
        self,
        signum: int,
        checkpoint: str | None,
        step: int | None = None,
        aborted=False,
        metrics: dict | None = None,
    ):
        self.signum, self.checkpoint, self.metrics = signum, checkpoint, metrics
        at = f" at step {step}" if step is not None else ""
        if aborted:
            kept = f"{checkpoint}, saved earlier, is kept" if checkpoint else "none was saved"
            super().__init__(f"Stopped by Ctrl-C{at} without saving ({kept}).")
            return
        saved = f"saved {checkpoint}" if checkpoint else "nothing saved"
        super().__init__(f"Stopped by {signal.Signals(signum).name}{at} ({saved}).")


class Diverged(RuntimeError):
    """The training loss or the weights became NaN or infinite; nothing was saved after that."""


class GracefulStop(L.Callback):
    """Ctrl-C or SIGTERM: finish the current batch, save ``last.ckpt``, raise ``Interrupted``.

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
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or checkpoint.dirpath is None:
            return None
        path = os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + ".ckpt")
        # a second Ctrl-C now would break torch.save mid-file: the save finishes first
        main = threading.current_thread() is threading.main_thread()
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            trainer.save_checkpoint(path, weights_only=False)  # the full state, to resume
        finally:
            if main:
                signal.signal(signal.SIGINT, handler)
        return path


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
