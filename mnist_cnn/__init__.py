"""mnist_cnn: the classic MNIST CNN notebook as a Lightning + Hydra template."""

import logging
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "conf"


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
