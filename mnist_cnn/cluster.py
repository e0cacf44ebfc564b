"""Beyond one machine (docs/ddp.md, docs/scale.md): Lightning's DDP strategy with a lost node
named in one line (``conf/trainer/ddp*.yaml``); Hydra callbacks (``conf/hydra/default.yaml``)
for a Slurm job that is requeued resuming in its run dir and for DDP jobs in a ``-m`` sweep.
"""

import logging
import os
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from lightning.pytorch.strategies import DDPStrategy as _LightningDDP
from omegaconf import DictConfig

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


class DDPInSweep(Callback):
    """Hydra callback for ``trainer=ddp`` in a ``-m`` sweep. Lightning's DDP launcher re-runs
    the command line for ranks 1..N-1: at each job's start this points that command at the job
    alone (its overrides, its dir; not the whole sweep again), and at its end closes the
    process group and restores the environment, so the next job starts its own ranks."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import read_write

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return
        self._saved = sys.argv, dict(os.environ)
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir  # what Lightning passes to ranks
        hydra_overrides = [o for o in hydra_cfg.overrides.hydra if not o.startswith("hydra.mode")]
        sys.argv = [sys.argv[0], *hydra_overrides, *hydra_cfg.overrides.task]

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        if not hasattr(self, "_saved"):
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.argv, env = self._saved
        os.environ.clear()
        os.environ.update(env)  # MASTER_PORT, LOCAL_RANK, WORLD_SIZE of this job gone
        del self._saved
