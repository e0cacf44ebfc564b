"""mnist_cnn: the classic MNIST CNN notebook as a Lightning + Hydra template."""

import logging
import os
import secrets
import signal
import sys
import warnings
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "conf"
RUN_ID = secrets.token_hex(3)  # one per process: two runs in the same second get two dirs
STARTED = datetime.now()
# torchrun calls the node rank GROUP_RANK; the run lock and rank-0 checks read NODE_RANK
if "TORCHELASTIC_RUN_ID" in os.environ and "GROUP_RANK" in os.environ:
    os.environ.setdefault("NODE_RANK", os.environ["GROUP_RANK"])


def _stopped_while_loading(signum, frame):
    print("Stopped by SIGTERM: run the same command again.", file=sys.stderr)
    sys.exit(128 + signum)


# python -m mnist_cnn.<command> (argv[0] is "-m" while the package loads): a SIGTERM while the
# libraries load says so; each command replaces this handler with its own
if sys.argv[:1] == ["-m"] or sys.argv[0].endswith("mnist-train"):
    signal.signal(signal.SIGTERM, _stopped_while_loading)

# Lightning's own noise at its source: an advert per run, and a deprecation inside Lightning
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip")
)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# conf/hydra/launcher/joblib.yaml takes the joblib launcher's name; Hydra checks it against that
# launcher's schema, and says so
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/joblib' is validated against")
# our bf16-mixed default: the summary's size estimate in float32 is fine
warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary")


def fast_precision(accelerator: str = "auto") -> str:
    """``bf16-mixed`` where ``accelerator`` computes bfloat16 natively (a CUDA GPU with bf16, a CPU
    with AVX512-BF16 or AMX), else ``32-true``; ``trainer.precision`` defaults to it.

    >>> fast_precision("cpu") in ("bf16-mixed", "32-true")
    True
    """
    import torch  # here, so that importing the package stays light

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    if accelerator in ("auto", "cpu") and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    ):
        return "bf16-mixed"
    return "32-true"


def run_dir(resume, new_dir: str, log_dir: str) -> str:
    """``hydra.run.dir``: ``new_dir``, or the run that ``resume`` names (``true``: the newest run
    under ``<log_dir>/runs``), so a resume continues in its own dir with one composition. Under
    torchrun every rank, on every node, takes rank 0's, so that all write one run dir."""
    if _torchrun_rank() > 0:
        return _torchrun_shared("run_dir")
    if resume in (False, None, "false"):
        return _torchrun_shared("run_dir", new_dir)
    from mnist_cnn.checkpoint import find_run  # torch: only when resuming

    run = find_run(log_dir, True if resume in (True, "true") else resume).resolve()
    return _torchrun_shared("run_dir", str(run))


def hydra_subdir(resume) -> str | None:
    """``hydra.output_subdir``: a resume's Hydra files wait in ``.hydra/pending`` until the run
    starts (``runinfo.RunRecord``), so a resume that fails leaves the run's record as it was.
    torchrun's ranks > 0 write none: rank 0 writes the run's."""
    if _torchrun_rank() > 0:
        return None
    return ".hydra" if resume in (False, None, "false") else ".hydra/pending"


def _torchrun_rank() -> int:
    """This process's global rank under torchrun; 0 elsewhere (Lightning's own DDP processes
    get their run dir and log name from Lightning)."""
    return int(os.environ.get("RANK", "0")) if "TORCHELASTIC_RUN_ID" in os.environ else 0


def job_name() -> str:
    """``hydra.job.name`` (the log's name): Hydra's, e.g. ``train``; under torchrun, ranks > 0
    log to ``train_ddp_process_<rank>.log`` as Lightning's own DDP processes do."""
    from hydra.core.utils import JobRuntime

    try:
        name = JobRuntime.instance().get("name")
    except KeyError:
        name = "app"
    return f"{name}_ddp_process_{rank}" if (rank := _torchrun_rank()) else name


def run_name() -> str:
    """A new run dir's name: ``<date>_<time>_<id>``, unique per process."""
    return f"{STARTED:%Y-%m-%d_%H-%M-%S}_{RUN_ID}"


def _torchrun_shared(key: str, value: str | None = None) -> str | None:
    """Under torchrun with several processes: rank 0 puts ``value`` in torchrun's own store and
    every other rank, on any node, waits for it; elsewhere ``value`` as it is."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return value
    from datetime import timedelta

    from torch.distributed import TCPStore

    from mnist_cnn.errors import ConfigError

    key = f"mnist_cnn/{key}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        store = TCPStore(host, port, is_master=False, timeout=timedelta(minutes=5))
        if _torchrun_rank() == 0:
            store.set(key, value)
            return value
        return store.get(key).decode()  # waits for rank 0
    except Exception as e:  # rank 0 failed before it chose the run dir: its output says why
        raise ConfigError(
            f"Rank {_torchrun_rank()} did not get the run dir from rank 0 through torchrun's "
            f"store at {host}:{port} ({type(e).__name__}); see node 0's output."
        ) from None


OmegaConf.register_new_resolver("run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("hydra_subdir", hydra_subdir, replace=True)
OmegaConf.register_new_resolver("fast_precision", fast_precision, replace=True)
OmegaConf.register_new_resolver("repo_root", lambda: str(ROOT), replace=True)
OmegaConf.register_new_resolver("run_id", lambda: RUN_ID, replace=True)
OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("job_name", job_name, replace=True)
