"""The LightningModule: the notebook's CNN with CrossEntropy, the configured optimizer and metrics.

>>> module = MNISTClassifier()
>>> module(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mnist_cnn.model import build_cnn

ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.001}


def _plain(value: Any) -> Any:
    """OmegaConf containers to plain dicts and lists, so checkpoints load with weights_only=True."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


class MNISTClassifier(L.LightningModule):
    """``net`` holds ``build_cnn`` keyword arguments; ``optimizer`` and ``scheduler`` are Hydra
    configs with ``_partial_: true``, instantiated in ``configure_optimizers``."""

    def __init__(
        self,
        net: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(
            {
                "net": _plain(net) or {},
                "optimizer": _plain(optimizer) or dict(ADAM),
                "scheduler": _plain(scheduler),
                "channels_last": channels_last,
            }
        )
        self.net = build_cnn(**self.hparams.net)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes=10, average="micro") for _ in range(3)
        )
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run remembers it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        getattr(self, f"{stage}_loss")(loss.detach(), weight=len(y))
        getattr(self, f"{stage}_acc")(logits.detach(), y)
        for name in ("loss", "acc"):
            metric = getattr(self, f"{stage}_{name}")
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

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
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = hydra.utils.instantiate(self.hparams.optimizer)(params=self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        scheduler = dict(self.hparams.scheduler)
        interval = scheduler.pop("interval", "epoch")
        if scheduler.pop("total_steps", None) == "auto":  # e.g. OneCycleLR
            scheduler["total_steps"] = int(self.trainer.estimated_stepping_batches)
        lr_scheduler = hydra.utils.instantiate(scheduler)(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": lr_scheduler, "interval": interval},
        }
