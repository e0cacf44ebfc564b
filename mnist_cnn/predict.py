"""Classify your own digit images, prepared the way MNIST was made.

python -m mnist_cnn.predict ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt \\
    inputs=[a.png,b.jpg,digits/]

Each image: grayscale; inverted when the background is light (MNIST is light ink on black);
cropped to the ink; scaled to fit a 20x20 box, keeping its aspect ratio; placed in 28x28 with
its centre of mass in the middle. Prints ``file  digit  probability`` per image; a missing or
unreadable file, or a folder with no images, is reported by name on stderr and the others still
run (exit status 1).

>>> preprocess(Image.open("digit.png")).shape  # doctest: +SKIP
torch.Size([1, 28, 28])
"""

import logging
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from PIL import Image

from mnist_cnn.checkpoint import CheckpointError, load_model
from mnist_cnn.validate import ConfigError, run_checked

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {s for s, f in Image.registered_extensions().items() if f in Image.OPEN}
COMMON_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LOOKED_FOR = (  # what a folder with no images is told
    f"looked for names ending in {', '.join(COMMON_SUFFIXES)} or one of the "
    f"{len(IMAGE_SUFFIXES - set(COMMON_SUFFIXES))} other suffixes Pillow reads"
)


def load_image(path: str | Path) -> Image.Image:
    """The decoded image (alpha flattened onto white); ``OSError`` when missing or unreadable."""
    with Image.open(path) as image:
        image.load()  # decode now: a truncated file fails here
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            white = Image.new("RGBA", image.size, "white")
            return Image.alpha_composite(white, image.convert("RGBA")).convert("L")
        return image.convert("L")


def preprocess(image: Image.Image, ink: float = 0.2) -> torch.Tensor:
    """A (1, 28, 28) float tensor in [0, 1], light ink on black, centred like MNIST digits.

    ``ink``: the fraction of the contrast above the background that counts as ink for the crop.
    """
    x = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255)
    border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])
    if border.median() > 0.5:  # dark ink on a light background
        x, border = 1 - x, 1 - border
    x = (x - border.median()).clamp(min=0)
    if x.max() <= 0:
        raise ValueError("no digit found: the image is blank")
    x = x / x.max()  # the background at 0, the strongest ink at 1
    rows, cols = (x > ink).any(1).nonzero(), (x > ink).any(0).nonzero()
    x = x[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = x.shape
    scale = 20 / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(x[None, None], size=size, mode="bilinear", antialias=True)[0, 0]
    x = x.clamp(0, 1)
    h, w = x.shape
    total = x.sum()
    # the centre of mass goes to (14, 14), where MNIST digits have theirs
    cy = (x.sum(1) * torch.arange(h)).sum() / total
    cx = (x.sum(0) * torch.arange(w)).sum() / total
    top = min(max(round(14 - float(cy)), 0), 28 - h)
    left = min(max(round(14 - float(cx)), 0), 28 - w)
    out = torch.zeros(28, 28)
    out[top : top + h, left : left + w] = x
    return out[None]


def expand(inputs: list[str]) -> list[Path]:
    """Files as given (missing ones too, to be reported); a folder gives its images, sorted, or
    itself when it holds none (to be reported)."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            paths += images or [path]
        else:
            paths.append(path)
    return paths


def predict(cfg: DictConfig) -> tuple[list[dict], list[dict]]:
    """Classify ``cfg.inputs`` with ``cfg.ckpt_path``; return (results, failures):
    ``{"file", "digit", "probability"}`` and ``{"file", "error"}`` per image."""
    if not cfg.get("ckpt_path") or not cfg.get("inputs"):
        raise ConfigError(
            "ckpt_path and inputs are required: python -m mnist_cnn.predict "
            "ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt inputs=[a.png,some_dir/]"
        )
    inputs = cfg.inputs if isinstance(cfg.inputs, ListConfig | list) else [cfg.inputs]
    model = load_model(cfg.ckpt_path)
    images, files, failures = [], [], []
    for path in expand([str(i) for i in inputs]):
        if path.is_dir():
            failures.append({"file": str(path), "error": f"a folder with no images ({LOOKED_FOR})"})
            continue
        try:
            images.append(preprocess(load_image(path)))
            files.append(str(path))
        except FileNotFoundError:
            failures.append({"file": str(path), "error": "no such file"})
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            failures.append({"file": str(path), "error": f"cannot read it as an image ({e})"})
    results = []
    if images:
        with torch.no_grad():
            probs = model(torch.stack(images)).softmax(-1)
        for file, p in zip(files, probs, strict=True):
            results.append({"file": file, "digit": int(p.argmax()), "probability": float(p.max())})
    return results, failures


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        results, failures = predict(cfg)
    except (ConfigError, CheckpointError) as e:
        log.error("%s", e)
        sys.exit(2)
    for r in results:
        print(f"{r['file']}\t{r['digit']}\t{r['probability']:.4f}")
    for f in failures:
        print(f"error: {f['file']}: {f['error']}", file=sys.stderr)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    run_checked(main, "predict")
