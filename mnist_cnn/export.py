"""The trained network for use without Lightning: ``model.pt`` (the network's state_dict, its
config with ``_target_``, and the class names and input shape; written by every run) and ONNX
with a dynamic batch.

python -m mnist_cnn.export ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt            # ONNX
python -m mnist_cnn.export ckpt_path=... format=pt output=model.pt

>>> net, info = load_weights("outputs/runs/<run>/model.pt")  # doctest: +SKIP
>>> info["classes"], net(torch.zeros(1, info["channels"], 28, 28)).shape  # doctest: +SKIP
"""

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from mnist_cnn.checkpoint import (
    CheckpointError,
    Describe,
    describe,
    load_checkpoint,
    load_model,
    module_of,
)
from mnist_cnn.errors import ConfigError, ExportError
from mnist_cnn.files import writing
from mnist_cnn.module import Classifier, checked_target, net_config
from mnist_cnn.validate import file_in_the_way, run, task

log = logging.getLogger(__name__)

FORMATS = ("onnx", "pt")
ONNX_TOLERANCE = 1e-4  # max abs difference of the logits, ONNX Runtime vs PyTorch


def weights(checkpoint: dict) -> dict:
    """The network alone from a Lightning checkpoint dict: ``state_dict``, ``net`` (its full
    config), ``classes``, ``channels``, ``image_size``, ``preprocess`` (plain types and tensors
    only: loads with ``weights_only=True``). Our ``Classifier``'s network is its ``net``; a
    module of the user's own is the network as a whole."""
    module, data = module_of(checkpoint), describe(checkpoint)
    hp = {**checkpoint["hyper_parameters"], **data}
    if issubclass(checked_target(module, L.LightningModule, "module"), Classifier):
        state = {k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        net = net_config(hp)
    else:
        state, net = checkpoint["state_dict"], module
    hydra.utils.instantiate(net).load_state_dict(state)  # fails here, not in the user's hands
    info = {k: hp[k] for k in ("classes", "channels", "image_size", "preprocess")}
    return {"state_dict": state, "net": net, **info}


def load_weights(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The network of a ``model.pt`` in eval mode, and the rest of the file (classes, input
    shape); its class is checked to be an ``nn.Module`` before it is built."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    checked_target(saved["net"], torch.nn.Module, "net")
    net = hydra.utils.instantiate(saved["net"])
    net.load_state_dict(saved["state_dict"])
    return net.eval(), saved


def save_weights(checkpoint: dict, path: str | Path) -> Path:
    """Write ``weights(checkpoint)`` to ``path`` with ``torch.save``."""
    path = Path(path)
    with writing(path) as partial:
        torch.save(weights(checkpoint), partial)
    return path


class ExportWeights(L.Callback):
    """After fit, writes the best checkpoint's network (the last weights when there is no
    checkpoint callback) to ``<run dir>/model.pt``."""

    def __init__(self, filename: str = "model.pt"):
        self.filename = filename

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if best:
            checkpoint = load_checkpoint(best)
        else:  # what a checkpoint of the module holds, with the record that names it
            state = {k: v.cpu() for k, v in pl_module.state_dict().items()}
            checkpoint = {"state_dict": state, "hyper_parameters": dict(pl_module.hparams)}
            for callback in trainer.callbacks:
                if isinstance(callback, Describe):
                    callback.on_save_checkpoint(trainer, pl_module, checkpoint)
        path = save_weights(checkpoint, Path(trainer.default_root_dir) / self.filename)
        log.info("wrote %s (weights of %s)", path, best or "the last epoch")


def export_onnx(net: torch.nn.Module, path: str | Path, shape=(1, 28, 28)) -> float:
    """Write ``net`` as ONNX with a dynamic batch; return the max abs difference of its outputs
    in ONNX Runtime against PyTorch on a random batch (raises when above ``ONNX_TOLERANCE``)."""
    import onnxruntime as ort  # the `onnx` extra

    net = net.eval().cpu()
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        net,
        (torch.rand(2, *shape),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        external_data=False,  # one file
        verbose=False,
    )
    x = torch.rand(7, *shape)  # another batch size than the export's: the batch is dynamic
    with torch.no_grad():
        expected = net(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x.numpy()})
    diff = float(abs(got - expected).max())
    if diff > ONNX_TOLERANCE:
        raise ExportError(
            f"The ONNX model's outputs differ from PyTorch's by {diff:.2e} (more than "
            f"{ONNX_TOLERANCE}), so it was not written. Update the exporter and runtime (pip "
            "install -U onnxscript onnxruntime), or export the weights with format=pt."
        )
    return diff


def export(cfg: DictConfig) -> Path:
    """Write the checkpoint's network as ``cfg.format`` to ``cfg.output`` (default: beside the
    checkpoint, ``<name>.onnx`` or ``<name>.pt``)."""
    if not cfg.get("ckpt_path"):
        raise ConfigError(
            "ckpt_path is required: python -m mnist_cnn.export "
            "ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt format=onnx"
        )
    if cfg.format not in FORMATS:
        raise ConfigError(
            f"format={cfg.format} is not one of {', '.join(FORMATS)}: use format=onnx"
        )
    ckpt = Path(cfg.ckpt_path)
    output = Path(cfg.output) if cfg.get("output") else ckpt.with_suffix(f".{cfg.format}")
    if output.exists() and ckpt.exists() and output.samefile(ckpt):
        default = (
            "" if cfg.get("output") else f" (by default, the checkpoint's name with .{cfg.format})"
        )
        raise ConfigError(
            f"The output {output}{default} would replace the checkpoint {ckpt} itself. Pass "
            f"another file: output=other.{cfg.format}"
        )
    if output.is_dir():
        raise _cannot_write(output, "it is a folder", cfg.format)
    if cfg.format == "pt":
        checkpoint = load_checkpoint(ckpt)
        try:
            save_weights(checkpoint, output)
        except OSError as e:
            raise _cannot_write(output, e, cfg.format) from None
        print(f"wrote {output}")
        return output
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"format=onnx needs the onnx extra ({e.name} is not installed): "
            "pip install -e '.[onnx]'"
        ) from None
    model = load_model(ckpt)
    shape = (model.hparams.channels, model.hparams.image_size, model.hparams.image_size)
    try:
        with writing(output) as partial:
            diff = export_onnx(model, partial, shape)  # its forward: the network and its input
    except OSError as e:
        raise _cannot_write(output, e, cfg.format) from None
    print(f"wrote {output} (ONNX Runtime vs PyTorch: max abs diff {diff:.1e})")
    return output


def _cannot_write(output: Path, why: OSError | str, fmt: str) -> ConfigError:
    """The error for an output that cannot be written, naming a file in its way."""
    if blocker := file_in_the_way(output.parent):
        why = f"{blocker} is a file, not a folder"
    elif isinstance(why, OSError):
        why = why.strerror or str(why)
    return ConfigError(f"Cannot write {output}: {why}. Pass output=/a/writable/file.{fmt}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@task
def main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except (ConfigError, CheckpointError) as e:
        log.error("%s", e)
        sys.exit(2)
    except ExportError as e:
        log.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    run(main)
