"""Load checkpoints safely: ``torch.load(weights_only=True)`` only, with a clear error.

>>> model = load_model("outputs/runs/<run>/checkpoints/last.ckpt")  # doctest: +SKIP
"""

import contextlib
import io
from pathlib import Path

import hydra
import lightning as L
import torch
import yaml
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from mnist_cnn.errors import CheckpointError, in_user_code, unwrap
from mnist_cnn.files import writing
from mnist_cnn.module import Classifier, checked_target

FIX = (
    "Pass a .ckpt written by `python -m mnist_cnn.train` (outputs/runs/<run>/checkpoints/"
    "last.ckpt or the best epoch*.ckpt) with ckpt_path=/path/to/file.ckpt."
)


def _fail(path, problem: str, fix: str = FIX) -> CheckpointError:
    return CheckpointError(f"Cannot use checkpoint {path}: {problem}. {fix}")


RECORD = "mnist_cnn"  # a checkpoint's key for its module's constructor call and its data
DATA_KEYS = ("classes", "channels", "image_size", "preprocess", "datamodule")
CLASSIFIER = f"{Classifier.__module__}.{Classifier.__qualname__}"


def plain(value):
    """``value`` with OmegaConf containers (anywhere inside) as plain dicts and lists, so a
    checkpoint loads with ``torch.load(weights_only=True)``."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    return value


class Describe(L.Callback):
    """Every checkpoint names its LightningModule: ``checkpoint["mnist_cnn"]`` holds ``module``
    (its ``_target_`` and every constructor argument, ``module_config``) and ``data`` (what the
    datamodule told it), so the tools rebuild the user's own class from the file alone. The
    module's and datamodule's own ``save_hyperparameters`` are kept in plain types."""

    def __init__(self, module: dict, data: dict):
        self.record = {"module": plain(module), "data": plain(data)}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RECORD] = self.record
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain(checkpoint[key])
        for key in ("hparams_type", "datamodule_hparams_type"):  # a class: weights_only refuses
            checkpoint.pop(key, None)


def module_of(state: dict) -> dict:
    """The module's constructor call that a checkpoint records; a checkpoint from before the
    record: our ``Classifier`` with its hyper-parameters."""
    record = (state.get(RECORD) or {}).get("module")
    if isinstance(record, dict):
        return {**record, "_recursive_": False}
    return {"_target_": CLASSIFIER, **state["hyper_parameters"], "_recursive_": False}


def describe(state: dict) -> dict:
    """How the checkpoint's model wants its data: ``classes``, ``channels``, ``image_size``,
    ``preprocess`` and ``datamodule``, from its record, else its hyper-parameters, else the
    MNIST defaults."""
    hp, data = state["hyper_parameters"], (state.get(RECORD) or {}).get("data") or {}
    found = {"channels": 1, "image_size": 28, "preprocess": "mnist"}
    found |= {k: hp[k] for k in DATA_KEYS if k in hp} | {k: data[k] for k in DATA_KEYS if k in data}
    found.setdefault("classes", [str(c) for c in range(10)])
    return found


_kept: dict = {}  # the checkpoint a run's start read, for its next read (Lightning's fit)


def load_checkpoint(
    path: str | Path, map_location="cpu", fix: str = FIX, lightning=True, keep=False
) -> dict:
    """The checkpoint dict, read with ``weights_only=True`` (no code from the file runs); a
    ``CheckpointError`` that ends with ``fix`` when it is missing, damaged or not ours. With
    ``keep``, the state is kept for the next read of the same unchanged file, which takes it:
    a run's start (the config check, ``train``, Lightning's fit) reads its checkpoint once."""
    path = Path(path)
    if path.is_dir():
        raise _fail(path, "it is a folder, not a file", fix)
    if not path.is_file():
        raise _fail(path, "no such file", fix)
    stat = path.stat()
    stamp = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if _kept.get("stamp") == stamp:
        state = _kept["state"]
        if not keep:
            _kept.clear()
        return state
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors all mean "not a usable checkpoint"
        why = type(e).__name__
        if unsafe := next((x for x in str(e).splitlines() if "Unsupported global" in x), None):
            why += f": {unsafe.strip()}; a value in it is not a plain type"  # e.g. a ListConfig
        raise _fail(path, f"it is not a readable checkpoint ({why})", fix) from None
    if not lightning:  # e.g. the weights ddp_spawn's processes hand back
        return state
    if not isinstance(state, dict) or "state_dict" not in state or "hyper_parameters" not in state:
        raise _fail(path, "it holds no Lightning state_dict and hyper_parameters", fix)
    net = state["hyper_parameters"].get("net")
    if isinstance(net, dict) and "_target_" not in net:  # an earlier release: the notebook's CNN
        state["hyper_parameters"]["net"] = {"_target_": "mnist_cnn.model.build_cnn", **net}
    if keep:
        _kept.update(stamp=stamp, state=state)
    return state


def older_release(state: dict, path) -> str:
    """Words for a checkpoint written before checkpoints named their module (``RECORD``): the
    commit that wrote it, from its run's ``run_info.yaml`` when that is beside it."""
    info = Path(path).parents[1] / "run_info.yaml"
    commit = None
    with contextlib.suppress(Exception):  # no run_info.yaml, or not ours: the commit is unknown
        commit = yaml.safe_load(info.read_text())[0]["git"]["commit"]
    which = f"commit {str(commit)[:7]} (its run_info.yaml)" if commit else "an earlier release"
    return f"it was written by {which}, before checkpoints named their module"


def epochs_done(state: dict) -> int:
    """How many training epochs a checkpoint has finished (a mid-epoch one: the epochs before)."""
    progress = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    return int(progress.get("current", {}).get("processed", state.get("epoch", 0)))


def check_continuation(state: dict, path, max_epochs: int | None, resume: bool) -> None:
    """Raise ``CheckpointError`` when training from ``state`` up to ``max_epochs`` cannot work:
    Lightning restores the epoch count, so ``trainer.max_epochs`` counts from the first start."""
    done = epochs_done(state)
    trained = f"{done} epoch{'' if done == 1 else 's'}"
    if max_epochs is None or max_epochs < 0 or max_epochs > done or (resume and max_epochs == done):
        return
    if resume:
        raise CheckpointError(
            f"Cannot resume {path}: that run has trained {trained}, more than "
            f"trainer.max_epochs={max_epochs}. The epochs count from the run's first start: "
            f"pass trainer.max_epochs={done} or more (or leave it out)."
        )
    raise CheckpointError(
        f"Nothing to train from {path}: it has already trained {trained}, and "
        f"trainer.max_epochs={max_epochs} counts from the start of that training (Lightning "
        f"restores the epoch count). Pass trainer.max_epochs={done + 1} or more to train more "
        f"epochs, or test it with: python -m mnist_cnn.eval ckpt_path={path}"
    )


def check_batch_size(state: dict, path, batch_size) -> None:
    """Raise ``CheckpointError`` when ``state`` stopped mid-epoch and ``batch_size`` is not the
    one it trained with: the rest of that epoch is counted in batches, so a new size would skip
    or repeat images."""
    progress = state.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    done = progress.get("current", {}).get("completed", 0)
    saved = (describe(state).get("datamodule") or {}).get("batch_size")
    if not done or progress.get("is_last_batch") or saved in (None, batch_size):
        return
    raise CheckpointError(
        f"Cannot train from {path} with data.batch_size={batch_size}: it stopped in the middle "
        f"of an epoch, after {done} batches of {saved}, and the rest of that epoch is counted in "
        f"batches. Pass data.batch_size={saved} (a new size can start from a checkpoint saved "
        "at an epoch's end, e.g. the best epoch*.ckpt)."
    )


def check_weights(model: Classifier, state: dict, path) -> None:
    """Raise ``CheckpointError`` when the checkpoint's weights do not fit ``model`` (a different
    ``model.net``) or its optimizer state is another optimizer's; on success ``model`` holds
    the weights."""
    saved = (state["hyper_parameters"].get("optimizer") or {}).get("_target_")
    wanted = (model.hparams.get("optimizer") or {}).get("_target_")
    if saved and saved != wanted:
        raise CheckpointError(
            f"Cannot train from checkpoint {path}: it holds the state of {saved}, and "
            f"model.optimizer is {wanted}. Training from a checkpoint restores its optimizer: "
            f"pass model.optimizer._target_={saved}, or train a new run without ckpt_path."
        )
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        detail = (str(e).splitlines()[1:] or [str(e)])[0].strip().rstrip(".")  # the first one
        if RECORD not in state:  # e.g. the metrics' names of an earlier release
            raise CheckpointError(
                f"Cannot train from checkpoint {path}: {older_release(state, path)}, and its "
                f"state does not fit this release ({detail}). Train from it with that release, "
                "or start a new run; eval, predict, export and serve read its weights."
            ) from None
        raise CheckpointError(
            f"Cannot train from checkpoint {path}: its weights do not fit the configured network "
            f"({detail}). It was trained with model.net={state['hyper_parameters'].get('net')}: "
            "pass the same model.net settings on the command line."
        ) from None


def _hparams_problem(hp: dict, module: dict, path) -> str | None:
    """What is wrong with a checkpoint's description of its module, data and network, before
    any of it is built (a crafted file must not make us allocate or import anything it likes)."""
    classes, channels, size = hp.get("classes"), hp.get("channels", 1), hp.get("image_size", 28)
    if classes is not None and not (
        isinstance(classes, list)
        and 1 <= len(classes) <= 100_000
        and all(isinstance(c, str) for c in classes)
    ):
        return "its classes are not a list of names"
    if not (isinstance(channels, int) and 1 <= channels <= 4):
        return f"its channels={channels!r} is not 1 to 4"
    if not (isinstance(size, int) and 1 <= size <= 4096):
        return f"its image_size={size!r} is not 1 to 4096"
    checks = [(module, L.LightningModule, "module"), (hp.get("datamodule"), L.LightningDataModule)]
    if isinstance(module.get("net"), dict):  # a network config inside it: our Classifier's
        checks.append((module["net"], nn.Module, "net"))
    for config, base, *name in checks:
        key = name[0] if name else "datamodule"
        if config is not None:
            try:
                checked_target(config, base, key)
            except ImportError as e:  # the user's own code, not found from here
                raise CheckpointError(
                    f"Cannot use checkpoint {path}: its {key} {config.get('_target_')} cannot be "
                    f"imported ({e}). Run from the folder that holds your code (where the run "
                    "started: its run_info.yaml says), or add that folder to PYTHONPATH."
                ) from None
            except (ValueError, TypeError, AttributeError) as e:
                return f"its {key} cannot be used ({e})"
    return None


def load_model(path: str | Path, map_location="cpu") -> L.LightningModule:
    """The checkpoint's LightningModule (ours or the user's own class, as its record names it) in
    eval mode with its weights; its ``hparams`` also hold what the tools read (``classes``,
    ``channels``, ``image_size``, ``preprocess``, ``datamodule``). The record is checked, and
    the module is first built on the meta device (no memory) to compare its shapes with the
    weights', before anything real is built. An error raised in the user's own code keeps its
    traceback."""
    state = load_checkpoint(path, map_location)
    module, data = module_of(state), describe(state)
    if problem := _hparams_problem(data, module, path):
        raise _fail(path, problem)
    name = module["_target_"].rpartition(".")[2]
    weights = state["state_dict"]
    if RECORD not in state:  # an earlier release: its network's weights (metrics were renamed)
        weights = {k: v for k, v in weights.items() if k.startswith("net.")}
    try:
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in hydra.utils.instantiate(module).state_dict().items()}
        if RECORD not in state:
            shapes = {k: v for k, v in shapes.items() if k.startswith("net.")}
        saved = {k: v.shape for k, v in weights.items()}
        if wrong := [k for k in shapes.keys() | saved.keys() if shapes.get(k) != saved.get(k)]:
            raise RuntimeError(f"{sorted(wrong)[0]} does not match its network")
        model = hydra.utils.instantiate(module)
        model.load_state_dict(weights, strict=RECORD in state)
    except Exception as e:
        cause = unwrap(e)
        if in_user_code(cause):
            raise cause from None
        if not isinstance(cause, TypeError | RuntimeError | ValueError):
            raise
        detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        old = f"; {older_release(state, path)}" if RECORD not in state else ""
        raise _fail(path, f"its weights do not fit its module {name} ({detail}){old}") from None
    for key, value in data.items():  # what eval, predict and serve read from model.hparams
        model.hparams.setdefault(key, value)
    return model.eval()


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, made safe both ways: a save goes to ``<file>.partial`` and is
    renamed over the old file only when complete (a kill mid-save leaves the old file intact),
    and a load (``trainer.fit(ckpt_path=...)``, ``trainer.test(ckpt_path="best")``) goes
    through ``load_checkpoint`` (``weights_only=True``, a clear ``CheckpointError``).

    >>> trainer = L.Trainer(plugins=[SafeCheckpointIO()])  # doctest: +SKIP
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        data = io.BytesIO()  # serialised first: a full disk is then an OSError, not torch's
        torch.save(checkpoint, data)  # "unexpected pos" RuntimeError from inside its zip writer
        with writing(path, fsync=True) as partial:
            partial.write_bytes(data.getbuffer())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        # Lightning also reads its own temporary files here (ddp_spawn's weights)
        return load_checkpoint(path, map_location=map_location, lightning=".temp" not in str(path))
