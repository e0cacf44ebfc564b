"""Callbacks beyond Lightning's own: the notebook's one line per epoch, kept as a history."""

import logging
import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

KEYS = ("train/loss", "train/acc", "val/loss", "val/acc")


class EpochSummary(L.Callback):
    """Prints ``epoch 3/20 | train loss 0.0412 acc 0.9871 | val loss 0.0390 acc 0.9880 | 12.3s``
    after each epoch and keeps the per-epoch values in ``history`` (saved in checkpoints)."""

    def __init__(self):
        self.history: list[dict[str, float]] = []
        self._start = 0.0

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
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
