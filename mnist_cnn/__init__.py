"""mnist_cnn: the classic MNIST CNN notebook as a Lightning + Hydra template."""

import logging
import secrets
import signal
import sys
import warnings
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "conf"
RUN_ID = secrets.token_hex(3)  # one per process: two runs in the same second get two dirs


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
    under ``<log_dir>/runs``), so a resume continues in its own dir with one composition."""
    if resume in (False, None, "false"):
        return new_dir
    from mnist_cnn.checkpoint import find_run  # torch: only when resuming

    return str(find_run(log_dir, True if resume in (True, "true") else resume).resolve())


def hydra_subdir(resume) -> str:
    """``hydra.output_subdir``: a resume's Hydra files wait in ``.hydra/pending`` until the run
    starts (``runinfo.RunRecord``), so a resume that fails leaves the run's record as it was."""
    return ".hydra" if resume in (False, None, "false") else ".hydra/pending"


OmegaConf.register_new_resolver("run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("hydra_subdir", hydra_subdir, replace=True)
OmegaConf.register_new_resolver("fast_precision", fast_precision, replace=True)
OmegaConf.register_new_resolver("repo_root", lambda: str(ROOT), replace=True)
OmegaConf.register_new_resolver("run_id", lambda: RUN_ID, replace=True)
