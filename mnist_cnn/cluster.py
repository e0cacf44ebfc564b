"""Training on several nodes (docs/ddp.md, docs/scale.md): Lightning's DDP strategy, with a
lost node named in one line.

python -m mnist_cnn.train trainer=ddp trainer.num_nodes=2     # conf/trainer/ddp*.yaml use it
"""

import signal
from pathlib import Path

from lightning.pytorch.strategies import DDPStrategy as _LightningDDP

from mnist_cnn.callbacks import Interrupted

# what gloo and NCCL say when a process on the other end is gone
LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote process exited",
    "NCCL communicator was aborted",
    "failed to recv, got 0 bytes",
)


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


def lost_peer(error: BaseException) -> str | None:
    """The line of ``error`` (or its causes) saying that a peer process is gone, or None."""
    while error is not None:
        for line in str(error).splitlines():
            if any(words in line for words in LOST):
                return line.split("] ")[-1].split(". ")[0].strip()  # gloo's: [file:line] ...
        error = error.__cause__ or error.__context__
    return None


class DDPStrategy(_LightningDDP):
    """Lightning's ``DDPStrategy``; when another rank dies, this one raises ``PeerLost`` (one
    line, exit 141) instead of the collective's traceback."""

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        if self.world_size < 2 or (why := lost_peer(exception)) is None:
            return
        trainer = self.lightning_module.trainer
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        raise PeerLost(
            self.global_rank, str(last) if last.exists() else None, trainer.global_step, why
        ) from None
