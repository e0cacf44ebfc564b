"""What a run shows: the notebook's figures (learning curves, 12 test digits, confusion matrix)
written to ``<run dir>/figures/`` and to TensorBoard, the hyper-parameters with the final metrics
for TensorBoard's HPARAMS tab, and the learning rate per epoch.

Figures are plain ``matplotlib.figure.Figure`` objects drawn with the Agg canvas (no pyplot
state, no display needed); in a notebook the returned figure shows itself.

>>> fig = learning_curves([{"epoch": 1, "train/loss": 0.2, "val/loss": 0.1,
...                         "train/acc": 0.94, "val/acc": 0.97}])
>>> save(fig, "/tmp/learning_curves.png")  # doctest: +SKIP
"""

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch.utils.tensorboard.summary import hparams
from torchmetrics.classification import MulticlassConfusionMatrix

from mnist_cnn.callbacks import EpochSummary

log = logging.getLogger(__name__)

NAMED_CLASSES = 30  # up to this many classes, the confusion matrix has numbers and names
MAX_CLASSES = 1000  # more: no confusion matrix (it would be a pixel or less per class)


def _names(pl_module) -> list[str]:
    """What the module logs (``Classifier.logged_metrics``), else what it has logged so far."""
    names = getattr(pl_module, "logged_metrics", None)
    return names() if callable(names) else sorted(pl_module.trainer.callback_metrics)


def _figure(**kwargs) -> Figure:
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG, making the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def learning_curves(history: list[dict]) -> Figure:
    """The notebook's two panels: loss and accuracy per epoch, train vs validation.

    ``history`` is ``EpochSummary.history``: one dict per epoch with ``epoch``, ``train/loss``,
    ``train/acc``, ``val/loss``, ``val/acc``.
    """
    fig = _figure(figsize=(10, 4), layout="constrained")
    epochs = [row["epoch"] for row in history]
    for ax, name, title in zip(
        fig.subplots(1, 2), ("loss", "acc"), ("Loss", "Accuracy"), strict=True
    ):
        for stage, label in (("train", "training"), ("val", "validation")):
            values = [row.get(f"{stage}/{name}", float("nan")) for row in history]
            ax.plot(epochs, values, marker="o", label=label)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    return fig


def prediction_grid(images: torch.Tensor, labels, preds, classes=None) -> Figure:
    """A 2x6 grid of the first 12 ``images`` (N, C, H, W) titled with the predicted class;
    a wrong prediction is titled in red with the true class, e.g. ``5 (true 3)``."""
    fig = _figure(figsize=(9, 3.6), layout="constrained")
    axes = fig.subplots(2, 6).flat  # fewer than 12 images leave empty axes
    name = (lambda i: classes[i]) if classes else str
    for ax, image, label, pred in zip(axes, images, labels, preds, strict=False):
        label, pred = int(label), int(pred)
        pixels = image.cpu().float().permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()
        ax.imshow(pixels, cmap="gray", vmin=0, vmax=1)
        right = label == pred
        title = name(pred) if right else f"{name(pred)} (true {name(label)})"
        ax.set_title(title, color="k" if right else "r")
        ax.axis("off")
    return fig


def confusion_matrix(metric: MulticlassConfusionMatrix, classes=None) -> Figure:
    """torchmetrics' plot of a computed confusion matrix: true label by row, predicted by column.
    Over ``NAMED_CLASSES`` classes, the counts as colours by class index, without the numbers
    and names that would not fit (torchmetrics writes one text per cell)."""
    fig = _figure(figsize=(7, 6), layout="constrained")
    n = metric.num_classes
    if n <= NAMED_CLASSES:
        labels = list(classes) if classes else [str(i) for i in range(n)]
        metric.plot(ax=fig.subplots(), labels=labels)
        fig.axes[0].set_title("Confusion matrix (test set)")
        return fig
    ax = fig.subplots()
    shown = ax.imshow(metric.compute().cpu().numpy(), cmap="viridis", interpolation="nearest")
    fig.colorbar(shown, ax=ax, label="images")
    ax.set(xlabel="predicted class (index)", ylabel="true class (index)")
    ax.set_title(f"Confusion matrix (test set, {n} classes)")
    return fig


def _flat(params: dict, prefix: str = "") -> dict:
    """Nested hyper-parameters as ``{"model.optimizer.lr": 0.001}``; lists and None as text."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            plain = isinstance(value, bool | int | float | str)
            flat[f"{prefix}{key}"] = value if plain else str(value)
    return flat


class Figures(L.Callback):
    """After fit: ``figures/learning_curves.png`` (from ``EpochSummary``'s history) and the
    hyper-parameters for TensorBoard's HPARAMS tab, with the train, val and test metrics as its
    columns. After test: ``figures/predictions.png`` (the first 12 test digits) and
    ``figures/confusion_matrix.png``. Each figure is also logged to TensorBoard as an image."""

    def __init__(self, folder: str = "figures", tags=()):
        self.folder, self.tags = folder, [str(t) for t in tags]
        self._logits: torch.Tensor | None = None
        self._hook = None
        self._confmat: MulticlassConfusionMatrix | None = None
        self._sample: list[torch.Tensor] = []
        self._classes: list[str] = []

    def _emit(self, trainer, name: str, fig: Figure) -> None:
        path = save(fig, Path(trainer.default_root_dir) / self.folder / f"{name}.png")
        pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]  # as saved: drawn once, not twice
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                tag, step = f"figures/{name}", trainer.global_step
                logger.experiment.add_image(tag, pixels, step, dataformats="HWC")
        log.info("wrote %s", path)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        summary = next((c for c in trainer.callbacks if isinstance(c, EpochSummary)), None)
        if summary and summary.history:
            self._emit(trainer, "learning_curves", learning_curves(summary.history))
        params = _flat({"model": dict(pl_module.hparams)})
        if trainer.datamodule is not None:
            params |= _flat({"data": dict(trainer.datamodule.hparams)})
        params["trainer.max_epochs"] = trainer.max_epochs
        params["tags"] = ", ".join(self.tags)
        # the columns; their values are the runs' own scalars with these tags
        exp, start, end = hparams(params, dict.fromkeys(_names(pl_module), 0.0))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # as Lightning's log_hyperparams(params, metrics) does, without its logging of
                # the metrics at step 0 (a false first point on every curve)
                writer = logger.experiment._get_file_writer()
                for summary_proto in (exp, start, end):
                    writer.add_summary(summary_proto, trainer.global_step)

    def on_test_start(self, trainer, pl_module) -> None:
        self._classes = list(pl_module.hparams.get("classes") or [])
        self._confmat = None  # made at the first batch: the class count is the logits' width
        self._sample = []
        self._hook = pl_module.register_forward_hook(self._keep_logits)

    def _keep_logits(self, module, inputs, output) -> None:
        self._logits = output.detach()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        preds = self._logits.argmax(-1)  # from the forward pass test_step just made
        width = self._logits.shape[-1]
        if self._confmat is None and width <= MAX_CLASSES:
            self._confmat = MulticlassConfusionMatrix(num_classes=width).to(pl_module.device)
        if self._confmat is not None:
            self._confmat.update(preds, y)
        if not self._sample:
            self._sample = [x[:12].cpu().float(), y[:12].cpu(), preds[:12].cpu(), width]

    def on_test_end(self, trainer, pl_module) -> None:
        self._hook.remove()
        if self._confmat is not None:
            self._confmat.compute()  # syncs across processes; every rank takes part
        if trainer.is_global_zero and self._sample:  # none: no test batch
            *sample, width = self._sample
            self._emit(trainer, "predictions", prediction_grid(*sample, classes=self._classes))
            if self._confmat is None:
                log.info(
                    "figures/confusion_matrix.png is not drawn: %d classes, more than the %d "
                    "it can show",
                    width,
                    MAX_CLASSES,
                )
            else:
                if width > NAMED_CLASSES:
                    log.info(
                        "figures/confusion_matrix.png: %d classes, drawn without the counts and "
                        "class names (over %d, they would not fit)",
                        width,
                        NAMED_CLASSES,
                    )
                figure = confusion_matrix(self._confmat, self._classes)
                self._emit(trainer, "confusion_matrix", figure)


class LRMonitor(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor``, idle when the run has no logger (``logger=none``)
    instead of stopping the run."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)
