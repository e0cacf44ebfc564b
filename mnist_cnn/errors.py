"""Every error this package raises on purpose: each message names the problem and the fix.

A leaf module: it imports nothing from the package, so any module can raise any of them."""

import signal
import sysconfig
import traceback
from pathlib import Path

from hydra.errors import InstantiationException


class ConfigError(ValueError):
    """A config value or key that is not allowed; the message names it and what to do."""


class TargetError(ConfigError):
    """A ``_target_`` that is not the kind of class the key needs."""


class RunInUse(ConfigError):
    """Another live process trains in the run dir."""


class TrackerError(ConfigError):
    """The tracker failed and the config says to stop (``on_error: stop``)."""


class DataError(RuntimeError):
    """MNIST is missing, damaged or cannot be written; the message says what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or not one of ours; the message says what to do."""


class StorageError(OSError):
    """A file of the run could not be written (full disk, a deleted or read-only run dir)."""


class Diverged(RuntimeError):
    """The training loss or the weights became NaN or infinite; nothing was saved after that."""


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


class PeerLost(Interrupted):
    """Another process of this run died (its node went down, or it was killed): this one stops
    too, keeping the newest ``last.ckpt``. Exit status 141 (128 + SIGPIPE: the other end is
    gone)."""

    def __init__(self, rank: int, checkpoint: str | None, step: int, why: str):
        super().__init__(signal.SIGPIPE, checkpoint, step)
        kept = "its last.ckpt is kept" if checkpoint else "no last.ckpt yet"
        self.args = (
            f"Rank {rank} lost the other processes of this run at step {step} ({why}): a node "
            f"died or was stopped, so this one stops too ({kept}); run every node's command "
            "again with resume=<run dir>.",
        )


class ImageError(ValueError):
    """An input that cannot be used as an image; the message names it and says why."""

    def __init__(self, name: str, problem: str):
        super().__init__(name, problem)
        self.name, self.problem = name, problem

    def __str__(self) -> str:
        return f"{self.name}: {self.problem}"


class ImageTooLarge(ImageError):
    """An image over Pillow's pixel limit (a decompression bomb, or just too large)."""


class ExportError(RuntimeError):
    """An export that does not reproduce the network; nothing is written."""


class SweepError(RuntimeError):
    """The folder is not a sweep dir; the message says what to pass instead."""


class TuneError(ValueError):
    """A search space or study setting that cannot work; the message says what to change."""


class Lost(Exception):
    """This worker's trial was failed by another one (no heartbeat for ``tune.grace_period``,
    e.g. this process was paused) and queued to run again: this worker leaves it."""


def in_user_code(error: BaseException) -> bool:
    """Whether ``error`` was raised in a file outside the installed libraries and this package:
    the user's own module, network, datamodule, metric, callback or logger."""
    library_dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    library_dirs.add(str(Path(__file__).parent))
    frames = traceback.extract_tb(error.__traceback__)  # from where it was caught to the raise
    return any(not f.filename.startswith(tuple(library_dirs)) for f in frames)


def unwrap(error: BaseException) -> BaseException:
    """The error inside Hydra's ``InstantiationException`` wrappers, however deeply nested (a
    network built inside a module built by ``instantiate``)."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error
