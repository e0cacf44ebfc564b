"""Beyond one machine (docs/ddp.md, docs/scale.md): Lightning's DDP strategy with a lost node
named in one line (``conf/trainer/ddp*.yaml``), and a Slurm job that is requeued resuming in its
run dir (a Hydra callback, ``conf/hydra/default.yaml``).
"""

import logging
import os
import shutil
from pathlib import Path

from hydra.experimental.callback import Callback
from lightning.pytorch.strategies import DDPStrategy as _LightningDDP

from mnist_cnn.errors import PeerLost

log = logging.getLogger(__name__)

# what gloo and NCCL say when a process on the other end is gone
LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote process exited",
    "NCCL communicator was aborted",
    "failed to recv, got 0 bytes",
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


class SlurmRequeue(Callback):
    """Hydra callback: a Slurm job that Slurm started again (pre-empted, ``scontrol requeue``, or
    requeued by Lightning on ``--signal=USR1``) continues from its run dir's newest checkpoint.
    Lightning's SLURM auto-resume loads ``hpc_ckpt_<n>.ckpt`` from the run dir; when our
    ``last.ckpt`` (saved on the SIGTERM that a requeue sends) is newer, it is linked as the next
    one, so the run goes on in the same dir instead of training from scratch."""

    def on_job_start(self, config, **kwargs) -> None:
        if int(os.environ.get("SLURM_RESTART_COUNT", "0")) < 1:
            return
        from hydra.core.hydra_config import HydraConfig

        run = Path(HydraConfig.get().runtime.output_dir)
        last = run / "checkpoints" / "last.ckpt"
        if not last.is_file():
            return  # stopped before its first checkpoint: it starts again
        hpc = sorted(run.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.split("_")[-1]))
        if hpc and hpc[-1].stat().st_mtime > last.stat().st_mtime:
            newest = hpc[-1]  # Lightning's own, saved on its requeue signal
        else:
            newest = run / f"hpc_ckpt_{int(hpc[-1].stem.split('_')[-1]) + 1 if hpc else 1}.ckpt"
            try:
                os.link(last, newest)
            except OSError:  # a file system without hard links
                shutil.copyfile(last, newest)
        log.info(
            "Slurm started job %s again (restart %s): it continues from %s",
            os.environ.get("SLURM_JOB_ID"),
            os.environ["SLURM_RESTART_COUNT"],
            newest,
        )
