"""Classify your own images with a checkpoint, prepared the way its training data was made.

python -m mnist_cnn.predict ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt \\
    inputs=[a.png,b.jpg,digits/]

Each image is read safely and prepared as the checkpoint asks (``mnist_cnn.images``; for MNIST:
grey, inverted when the background is light, cropped to the ink, fitted into 20x20, centred by
its centre of mass in 28x28), the same way ``python -m mnist_cnn.serve`` prepares it. Prints
``file  class  index  probability`` (tab-separated) per image, and for a folder of class
folders (``my_data/test/<class>/*.png``) the accuracy overall and per class on stderr. A
missing or unreadable file, a FIFO, device or folder where an image was expected, an
over-large image, or a folder with no images is reported by name on stderr and the others
still run (exit status 1).
"""

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig
from PIL import Image

from mnist_cnn.checkpoint import load_model
from mnist_cnn.errors import CheckpointError, ConfigError, ImageError
from mnist_cnn.images import class_names, open_image, prepare, spec
from mnist_cnn.validate import run, task

log = logging.getLogger(__name__)

preprocess = prepare  # the name notebooks/checkpoint.ipynb imports
IMAGE_SUFFIXES = {s for s, f in Image.registered_extensions().items() if f in Image.OPEN}
COMMON_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LOOKED_FOR = (  # what a folder with no images is told
    f"looked for names ending in {', '.join(COMMON_SUFFIXES)} or one of the "
    f"{len(IMAGE_SUFFIXES - set(COMMON_SUFFIXES))} other suffixes Pillow reads"
)
BATCH = 256  # images through the model at once


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def expand(inputs: list[str]) -> tuple[list[Path], list[dict], dict[Path, str]]:
    """(paths, failures, labels): files as given (missing ones too, to be reported); a folder
    gives its entries with an image suffix, sorted; a folder with none but sub-folders of images
    (``test/<class>/*.png``) gives theirs, labelled with the sub-folder's name; a folder with
    neither is a failure."""
    paths, failures, labels = [], [], {}
    for item in inputs:
        path = Path(item)
        if not path.is_dir():
            paths.append(path)
            continue
        try:
            images = _images_in(path)
            if not images:
                subs = sorted(p for p in path.iterdir() if p.is_dir() and p.name[0] != ".")
                for sub in subs:
                    found = _images_in(sub)
                    images += found
                    labels |= dict.fromkeys(found, sub.name)
        except OSError as e:
            failures.append({"file": str(path), "error": f"cannot list the folder ({e.strerror})"})
            continue
        paths += images
        if not images:
            failures.append({"file": str(path), "error": f"a folder with no images ({LOOKED_FOR})"})
    return paths, failures, labels


def accuracy(results: list[dict], labels: dict[Path, str], names: list[str]) -> list[str]:
    """Lines for the images whose folder names one of the checkpoint's classes: the accuracy
    overall and per class; a line saying why when no folder names one."""
    known = {p: c for p, c in labels.items() if c in names}
    if not labels:
        return []
    if not known:
        return [
            f"no accuracy: the sub-folders ({', '.join(sorted(set(labels.values())))}) name "
            f"none of the checkpoint's classes ({', '.join(names[:20])})"
        ]
    right: dict[str, list[bool]] = {}
    for r in results:
        if (label := known.get(Path(r["file"]))) is not None:
            right.setdefault(label, []).append(r["class"] == label)
    scored = [x for v in right.values() for x in v]
    lines = [f"accuracy {sum(scored) / len(scored):.4f} ({sum(scored)} of {len(scored)} images)"]
    for name in sorted(right, key=names.index):
        v = right[name]
        lines.append(f"  class {name}: {sum(v) / len(v):.4f} ({sum(v)} of {len(v)})")
    if others := sorted(set(labels.values()) - set(names)):
        lines.append(
            f"  not scored: sub-folders {', '.join(others)} name no class of the checkpoint"
        )
    return lines


def predict(cfg: DictConfig) -> tuple[list[dict], list[dict], list[str]]:
    """Classify ``cfg.inputs`` with ``cfg.ckpt_path``; return (results, failures, summary):
    ``{"file", "class", "index", "probability"}`` and ``{"file", "error"}`` per image, and the
    accuracy lines of images in class folders (``accuracy``)."""
    if not cfg.get("ckpt_path") or not cfg.get("inputs"):
        raise ConfigError(
            "ckpt_path and inputs are required: python -m mnist_cnn.predict "
            "ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt inputs=[a.png,some_dir/]"
        )
    inputs = cfg.inputs if isinstance(cfg.inputs, ListConfig | list) else [cfg.inputs]
    model = load_model(cfg.ckpt_path)
    try:
        how, names = spec(model.hparams), class_names(model.hparams)
    except ValueError as e:
        raise CheckpointError(f"Cannot use checkpoint {cfg.ckpt_path} for images: {e}") from None
    paths, failures, labels = expand([str(i) for i in inputs])
    images, files = [], []
    for path in paths:
        try:
            images.append(prepare(open_image(path), **how))
            files.append(str(path))
        except ImageError as e:
            failures.append({"file": str(path), "error": e.problem})
    results = []
    with torch.no_grad():
        for start in range(0, len(images), BATCH):
            probs = model(torch.stack(images[start : start + BATCH])).softmax(-1)
            for file, p in zip(files[start : start + BATCH], probs, strict=True):
                index = int(p.argmax())
                results.append(
                    {
                        "file": file,
                        "class": names[index],
                        "index": index,
                        "probability": float(p[index]),
                    }
                )
    return results, failures, accuracy(results, labels, names)


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@task
def main(cfg: DictConfig) -> None:
    try:
        results, failures, summary = predict(cfg)
    except (ConfigError, CheckpointError) as e:
        log.error("%s", e)
        sys.exit(2)
    for r in results:
        print(f"{r['file']}\t{r['class']}\t{r['index']}\t{r['probability']:.4f}")
    for line in summary:  # stderr: stdout stays one tab-separated line per image
        print(line, file=sys.stderr)
    for f in failures:
        print(f"error: {f['file']}: {f['error']}", file=sys.stderr)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    run(main)
