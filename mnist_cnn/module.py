"""The LightningModule: the notebook's CNN with CrossEntropy, the configured optimizer and metrics.

>>> module = MNISTClassifier()
>>> module(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

import math
import os
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mnist_cnn.model import build_cnn

ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.001}

# Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (fork-safe CUDA checks). Without a GPU, every
# torch.cuda.is_available() then tries to load NVML, and torch's optimizers ask at every step
# (0.25 ms of a 25 ms step here); with no GPU there is no CUDA state a fork could break.
if not torch.cuda.is_available():
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


def _plain(value: Any) -> Any:
    """OmegaConf containers to plain dicts and lists, so checkpoints load with weights_only=True."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def random_affine(x: torch.Tensor, degrees=0.0, translate=0.0, scale=0.0) -> torch.Tensor:
    """Rotate by up to ``degrees``, shift by up to ``translate`` of the size and zoom by up to
    ``scale``, drawn per image for a whole batch in one call (torchvision's RandomAffine draws
    one set per call).

    >>> random_affine(torch.rand(8, 1, 28, 28), degrees=10, translate=0.1).shape
    torch.Size([8, 1, 28, 28])
    """
    n = len(x)
    u = torch.rand(n, 4, device=x.device) * 2 - 1  # uniform in [-1, 1]
    angle, zoom = u[:, 0] * math.radians(degrees), 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    shift = u[:, 2:] * 2 * translate  # grid coordinates span [-1, 1]
    theta = torch.stack([cos, -sin, shift[:, 0], sin, cos, shift[:, 1]], 1).view(n, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


class EMA(EMAWeightAveraging):
    """Lightning's EMA of the weights, used for validation, checkpoints and test.

    Lightning's callback restores the raw (non-averaged) weights whenever it loads a checkpoint,
    so ``trainer.test(ckpt_path="best")`` would test those; here only resuming ``fit`` does, and
    testing uses the averaged weights the checkpoint's ``state_dict`` holds.
    """

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class MNISTClassifier(L.LightningModule):
    """``net`` holds ``build_cnn`` keyword arguments; ``optimizer`` and ``scheduler`` are Hydra
    configs with ``_partial_: true``, instantiated in ``configure_optimizers``."""

    def __init__(
        self,
        net: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        channels_last: bool = False,
        augment: dict | None = None,
        compile: bool = False,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters(
            {
                "net": _plain(net) or {},
                "optimizer": _plain(optimizer) or dict(ADAM),
                "scheduler": _plain(scheduler),
                "channels_last": channels_last,
                "augment": _plain(augment),
                "compile": compile,
                "label_smoothing": label_smoothing,
            }
        )
        self.net = build_cnn(**self.hparams.net)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:  # the state_dict keeps its names: compile wraps, self.net stays the module
            self.net.compile()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # no input checks and no NaN filtering: each is a host-device sync per step on a GPU;
        # the labels come from the datamodule, and a NaN loss shows in the mean (FiniteCheck)
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes=10, average="micro", validate_args=False)
            for _ in range(3)
        )
        self.train_loss, self.val_loss, self.test_loss = (
            MeanMetric(nan_strategy="disable") for _ in range(3)
        )
        self.val_acc_best = MaxMetric()
        # kept in checkpoints: a resumed run remembers the best, and the epoch's train metrics
        # so far when it resumes mid-epoch
        for metric in (self.val_acc_best, self.train_loss, self.train_acc):
            metric.persistent(True)
        self._train_logged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _step(self, batch, stage: str, log: bool = True) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        # update, not forward: the values are logged per epoch, so no per-batch compute
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=len(y))
        getattr(self, f"{stage}_acc").update(logits.detach(), y)
        for name in ("loss", "acc") if log else ():
            metric = getattr(self, f"{stage}_{name}")
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_train_epoch_start(self) -> None:
        # not called when resuming mid-epoch: the metrics then keep the checkpoint's batches
        self.train_loss.reset()
        self.train_acc.reset()
        self._train_logged = False

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.hparams.augment:
            batch = (random_affine(batch[0], **self.hparams.augment), batch[1])
        # Lightning keeps a logged Metric and computes and resets it at the epoch's end, so one
        # self.log per epoch gives the same values as one per step (which costs 2% of a step)
        loss = self._step(batch, "train", log=not self._train_logged)
        self._train_logged = True
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Class probabilities for a batch of images (or of (images, labels))."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x).softmax(dim=-1)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        optimizer = hydra.utils.instantiate(self.hparams.optimizer)(params=self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        scheduler = dict(self.hparams.scheduler)
        interval = scheduler.pop("interval", "epoch")
        if scheduler.pop("total_steps", None) == "auto":  # e.g. OneCycleLR
            steps = int(self.trainer.estimated_stepping_batches)
            warmup = scheduler.get("pct_start", 0.3)  # OneCycleLR divides by warmup*steps - 1
            if "OneCycleLR" in str(scheduler.get("_target_")) and warmup * steps <= 1:
                steps = math.floor(1 / warmup) + 1  # a few-batch debug run
            scheduler["total_steps"] = steps
        lr_scheduler = hydra.utils.instantiate(scheduler)(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": lr_scheduler, "interval": interval},
        }
