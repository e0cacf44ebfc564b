"""Load checkpoints safely: ``torch.load(weights_only=True)`` only, with a clear error.

>>> model = load_model("outputs/runs/<run>/checkpoints/last.ckpt")  # doctest: +SKIP
"""

from pathlib import Path

import torch

from mnist_cnn.module import MNISTClassifier


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or not one of ours; the message says what to do."""


def _fail(path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"Cannot use checkpoint {path}: {problem}. Pass a .ckpt written by `python -m "
        "mnist_cnn.train` (outputs/runs/<run>/checkpoints/last.ckpt or the best epoch*.ckpt) "
        "with ckpt_path=/path/to/file.ckpt."
    )


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint dict, read with ``weights_only=True`` (no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors all mean "not a usable checkpoint"
        raise _fail(path, f"it is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "state_dict" not in state or "hyper_parameters" not in state:
        raise _fail(path, "it holds no Lightning state_dict and hyper_parameters")
    return state


def load_model(path: str | Path, map_location="cpu") -> MNISTClassifier:
    """An ``MNISTClassifier`` in eval mode with the checkpoint's weights."""
    state = load_checkpoint(path, map_location)
    try:
        model = MNISTClassifier(**state["hyper_parameters"])
        model.load_state_dict(state["state_dict"])
    except (TypeError, RuntimeError) as e:
        raise _fail(path, f"its weights do not fit the model ({str(e).splitlines()[0]})") from None
    return model.eval()
