"""A researcher's own LightningModules, outside the package: a subclass of ours with its own
argument and loss, and one written from scratch against the contract in the README."""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mnist_cnn.module import Classifier

STAGES = ("train", "val", "test")


class FocalLoss(nn.Module):
    """Cross-entropy down-weighting the examples the model already gets right."""

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits, target):
        log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
        return (-((1 - log_p.exp()) ** self.gamma) * log_p).mean()


class FocalClassifier(Classifier):
    """Our Classifier with a focal loss; ``gamma`` is its own argument."""

    def __init__(self, gamma: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.criterion = FocalLoss(gamma)


class TinyModule(L.LightningModule):
    """A module written from scratch: an MLP, its own Adam, the metric names of the template."""

    def __init__(self, hidden: list, lr: float = 1e-3, channels: int = 1, classes=None):
        super().__init__()
        self.save_hyperparameters()  # hidden arrives as an OmegaConf ListConfig
        classes = classes or [str(i) for i in range(10)]
        sizes = [channels * 28 * 28, *hidden]
        layers = [nn.Flatten()]
        for a, b in zip(sizes, sizes[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], len(classes)))
        self.accuracy = nn.ModuleDict(  # one metric object per stage
            {f"{s}_acc": MulticlassAccuracy(len(classes), average="micro") for s in STAGES}
        )

    def forward(self, x):
        return self.net(x.float())

    def _step(self, batch, stage):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        self.accuracy[f"{stage}_acc"](logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", self.accuracy[f"{stage}_acc"], on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
