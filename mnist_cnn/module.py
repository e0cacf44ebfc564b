"""The LightningModule: any network (``model.net``, a Hydra ``_target_``) with CrossEntropy, the
configured optimizer and the configured torchmetrics (``model.metrics``), logged per epoch as
``train/<name>``, ``val/<name>`` and ``test/<name>`` beside ``<stage>/loss``.

>>> module = Classifier()
>>> module(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

import inspect
import math
import typing
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import get_object
from lightning.pytorch.callbacks import EMAWeightAveraging
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, Metric, MetricCollection

from mnist_cnn.errors import TargetError

ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.001}
SEED_CNN = {"_target_": "mnist_cnn.model.build_cnn"}
ACCURACY = {
    "acc": {
        "_target_": "torchmetrics.classification.MulticlassAccuracy",
        "average": "micro",
        "validate_args": False,
    }
}


def checked_target(config: dict, base: type, key: str):
    """The class or factory ``config["_target_"]`` names, when it is a subclass of ``base`` or a
    function annotated to return one; checked before anything is built (a checkpoint names
    its classes, and must not be able to name any other callable)."""
    target = config.get("_target_") if isinstance(config, dict) else None
    if not isinstance(target, str):
        raise TargetError(f"{key} needs a _target_ naming a {base.__name__} class")
    obj = get_object(target)  # ImportError or ValueError when it does not exist
    if inspect.isclass(obj) and issubclass(obj, base):
        return obj
    returns = typing.get_type_hints(obj).get("return") if inspect.isfunction(obj) else None
    if inspect.isclass(returns) and issubclass(returns, base):
        return obj
    raise TargetError(
        f"{key}._target_={target} is not a {base.__name__} subclass, nor a function annotated "
        f"to return one (def make(...) -> {base.__name__})"
    )


def completed(config: dict, base: type, key: str, data: dict) -> dict:
    """``config`` with those of ``data`` (channels, classes, size) its target accepts."""
    params = inspect.signature(checked_target(config, base, key)).parameters
    return {**{k: v for k, v in data.items() if k in params}, **config}


def _build(config: dict, base: type, key: str, data: dict):
    return hydra.utils.instantiate(completed(config, base, key, data))


def net_config(hparams) -> dict:
    """The network's full config in a module's hyper-parameters: ``_target_``, its arguments and
    what it is told about the data; ``hydra.utils.instantiate`` rebuilds it alone."""
    data = {"in_channels": hparams["channels"], "num_classes": len(hparams["classes"])}
    data["image_size"] = hparams["image_size"]
    return completed(dict(hparams["net"]), nn.Module, "model.net", data)


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


class Classifier(L.LightningModule):
    """``net``: the network's config (``_target_`` and its arguments); it is given
    ``in_channels``, ``num_classes`` and ``image_size`` from the data when its signature asks.
    ``metrics``: ``{name: torchmetrics config}``, each given ``num_classes``. ``optimizer`` and
    ``scheduler``: Hydra configs with ``_partial_: true``, built in ``configure_optimizers``.
    ``classes``, ``channels``, ``image_size``, ``preprocess`` and ``datamodule`` describe the
    data, so a checkpoint alone rebuilds everything (eval, predict, export, serve)."""

    def __init__(
        self,
        net: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        metrics: dict | None = None,
        classes: list | None = None,
        channels: int = 1,
        image_size: int = 28,
        preprocess: str = "mnist",
        datamodule: dict | None = None,
        channels_last: bool = False,
        augment: dict | None = None,
        compile: bool = False,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        classes = [str(c) for c in (_plain(classes) or range(10))]
        self.save_hyperparameters(
            {
                "net": _plain(net) or dict(SEED_CNN),
                "optimizer": _plain(optimizer) or dict(ADAM),
                "scheduler": _plain(scheduler),
                "metrics": _plain(metrics) if metrics is not None else dict(ACCURACY),
                "classes": classes,
                "channels": int(channels),
                "image_size": int(image_size),
                "preprocess": preprocess,
                "datamodule": _plain(datamodule),
                "channels_last": channels_last,
                "augment": _plain(augment),
                "compile": compile,
                "label_smoothing": label_smoothing,
            }
        )
        data = {"in_channels": int(channels), "num_classes": len(classes)}
        data["image_size"] = int(image_size)
        self.net = _build(self.hparams.net, nn.Module, "model.net", data)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:  # the state_dict keeps its names: compile wraps, self.net stays the module
            self.net.compile()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # no input checks and no NaN filtering: each is a host-device sync per step on a GPU;
        # the labels come from the datamodule, and a NaN loss shows in the mean (FiniteCheck)
        made = {
            name: _build(
                dict(config), Metric, f"model.metrics.{name}", {"num_classes": len(classes)}
            )
            for name, config in (self.hparams.metrics or {}).items()
        }
        self.train_metrics, self.val_metrics, self.test_metrics = (
            MetricCollection({k: m.clone() for k, m in made.items()}, prefix=f"{stage}/")
            for stage in ("train", "val", "test")
        )
        self.train_loss, self.val_loss, self.test_loss = (
            MeanMetric(nan_strategy="disable") for _ in range(3)
        )
        self.val_acc_best = MaxMetric()
        # kept in checkpoints: a resumed run remembers the best, and the epoch's train metrics
        # so far when it resumes mid-epoch
        for metric in (self.val_acc_best, self.train_loss, *self.train_metrics.values()):
            metric.persistent(True)
        self._train_logged = False

    def logged_metrics(self) -> list[str]:
        """The names this module logs: ``train/loss``, ``train/<metric>``, ... ``test/<metric>``,
        and ``val/acc_best`` when there is an ``acc`` metric."""
        names = [
            f"{s}/{m}" for s in ("train", "val", "test") for m in ("loss", *self.hparams.metrics)
        ]
        return names + (["val/acc_best"] if "acc" in self.hparams.metrics else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # images as stored (0..255), e.g. from a notebook
            x = x.float().div(255)
        if x.dtype != self.dtype and x.is_floating_point():  # e.g. precision=bf16-true
            x = x.to(self.dtype)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _step(self, batch, stage: str, log: bool = True) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        # update, not forward: the values are logged per epoch, so no per-batch compute
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=len(y))
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), y)
        if log:
            kw = {"on_step": False, "on_epoch": True, "prog_bar": True}
            self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"), **kw)
            self.log_dict(metrics, **kw)
        return loss

    def on_train_epoch_start(self) -> None:
        # not called when resuming mid-epoch: the metrics then keep the checkpoint's batches
        self.train_loss.reset()
        self.train_metrics.reset()
        self._train_logged = False

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.hparams.augment:
            batch = (random_affine(batch[0], **self.hparams.augment), batch[1])
        # Lightning keeps a logged Metric and computes and resets it at the epoch's end, so one
        # self.log per epoch gives the same values as one per step
        loss = self._step(batch, "train", log=not self._train_logged)
        self._train_logged = True
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or "acc" not in self.val_metrics:
            return
        self.val_acc_best(self.val_metrics["acc"].compute())
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


def logged_metrics(model: L.LightningModule) -> list[str]:
    """What ``model`` logs, for the checks of ``monitor`` and ``optimized_metric``: its own
    ``logged_metrics()`` when it has one (a user's module may not: then nothing is checked)."""
    names = getattr(model, "logged_metrics", None)
    return names() if callable(names) else []


def told_by(cfg: DictConfig, datamodule: L.LightningDataModule | None) -> dict:
    """What the datamodule tells the module (``classes``, ``channels``, ``image_size``,
    ``preprocess``, those it has) and the datamodule's own config (``_target_`` and its
    arguments), so a checkpoint names its data."""
    told = {}
    if datamodule is not None:
        for key in ("classes", "channels", "image_size", "preprocess"):
            if hasattr(datamodule, key):
                told[key] = _plain(getattr(datamodule, key))
        target = cfg.data.get("_target_") if cfg.get("data") else None
        accepted = inspect.signature(type(datamodule)).parameters  # its own arguments only
        hparams = {k: v for k, v in datamodule.hparams.items() if k in accepted}
        told["datamodule"] = {"_target_": target, **_plain(hparams)}
    return told


def module_config(cfg: DictConfig, datamodule: L.LightningDataModule | None = None) -> dict:
    """The module's whole constructor call in plain types: ``cfg.model`` (its ``_target_`` and
    arguments) and what the datamodule tells it, where its signature accepts it (ours accepts
    all). ``hydra.utils.instantiate`` of it builds the module; checkpoints keep it."""
    config = OmegaConf.to_container(cfg.model, resolve=True)
    config.setdefault("_target_", f"{Classifier.__module__}.{Classifier.__qualname__}")
    module = checked_target(config, L.LightningModule, "model")
    told = told_by(cfg, datamodule)
    if not issubclass(module, Classifier):  # a module of the user's: what it accepts
        params = inspect.signature(module).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            told = {k: v for k, v in told.items() if k in params}
    return {**config, **told, "_recursive_": False}


def make_model(cfg: DictConfig, datamodule: L.LightningDataModule | None = None):
    """The ``cfg.model`` module, built from ``module_config``; the optimizer and scheduler
    classes are looked up now, before any work."""
    model = hydra.utils.instantiate(module_config(cfg, datamodule))
    for part in ("optimizer", "scheduler"):
        if isinstance(cfg.model.get(part), DictConfig) and "_target_" in cfg.model[part]:
            hydra.utils.get_method(cfg.model[part]._target_)
    return model
