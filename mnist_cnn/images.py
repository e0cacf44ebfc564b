"""Read an image safely and prepare it for a checkpoint, the same way for predict and serve.

>>> model = load_model("outputs/runs/<run>/checkpoints/last.ckpt")  # doctest: +SKIP
>>> x = prepare(open_image("digit.jpg"), **spec(model.hparams))  # (1, 28, 28) in [0, 1]
"""

import io
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_cnn.errors import ImageError, ImageTooLarge

STYLES = ("mnist", "resize")
NOT_REGULAR = {  # what a path is when it is not a regular file
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _open_file(path: Path) -> io.BufferedReader:
    """``path`` opened for reading, refused without blocking unless it is a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError(str(path), "no such file") from None
    except OSError as e:
        raise ImageError(str(path), f"cannot read it ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise ImageError(str(path), "a folder, not an image file")
    if not stat.S_ISREG(mode):
        what = NOT_REGULAR.get(stat.S_IFMT(mode), "not a regular file")
        raise ImageError(str(path), f"{what}, not an image file: pass a regular image file")
    try:  # O_NONBLOCK: a FIFO swapped in after the stat opens without waiting for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ImageError(str(path), f"cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(str(path), "not a regular file, not an image file")
    return os.fdopen(fd, "rb")


def _too_large(name: str, pixels: int | None, max_pixels: int | None = None) -> ImageTooLarge:
    size = f"{pixels:,} pixels" if pixels else "its size"
    limit = f"Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels (PIL.Image.MAX_IMAGE_PIXELS)"
    if max_pixels and (not Image.MAX_IMAGE_PIXELS or max_pixels < Image.MAX_IMAGE_PIXELS):
        limit = f"max_pixels={max_pixels:,}"
    return ImageTooLarge(
        name,
        f"{size} is more than {limit}: a decompression bomb or an over-large image; "
        "scale it down to a few megapixels",
    )


def _normalize(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit "L" (grey) or "RGB": 16-bit and float scaled (not clipped), alpha and
    palette transparency flattened onto white."""
    if image.mode.startswith("I") or image.mode == "F":
        a = np.array(image, dtype=np.float32)  # changed in place below: one copy in memory
        if image.mode.startswith("I;16") or (image.mode == "I" and a.max(initial=0) > 255):
            a /= 257  # 16-bit (PNG, TIFF): 65535 -> 255
        elif image.mode == "F" and a.max(initial=0) <= 1:
            a *= 255  # float images in [0, 1]
        return Image.fromarray(np.clip(np.rint(a, out=a), 0, 255, out=a).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        grey = image.mode in ("LA", "La", "L")
        white = Image.new("RGBA", image.size, "white")
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        flat = Image.alpha_composite(white, rgba).convert("RGB")
        return flat.convert("L") if grey else flat
    if image.mode in ("L", "RGB"):
        return image
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV


def open_image(
    source: str | Path | bytes, name: str | None = None, max_pixels: int | None = None
) -> Image.Image:
    """The decoded image in mode "L" or "RGB", upright (EXIF orientation applied), 16-bit
    scaled to 8, alpha flattened onto white. ``ImageError`` (a ``ValueError``) names ``source``
    (or ``name``) when it is missing, not a regular file (a FIFO, device, socket or folder is
    refused without blocking), not an image, truncated, or over Pillow's pixel limit or
    ``max_pixels`` (``ImageTooLarge``, read from the header: nothing is decoded)."""
    if isinstance(source, bytes | bytearray | memoryview):
        name = name or "the image"
        if not source:
            raise ImageError(name, "empty: no image data")
        file = io.BytesIO(source)
    else:
        name = name or str(source)
        file = _open_file(Path(source))
    with file, warnings.catch_warnings():
        # Pillow only warns between its pixel limit and twice it; make that an error too
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(file) as image:
                # the check again, as catch_warnings is not thread-safe (serve decodes in threads)
                pixels = image.width * image.height
                limits = [n for n in (Image.MAX_IMAGE_PIXELS, max_pixels) if n]
                if limits and pixels > min(limits):
                    raise _too_large(name, pixels, max_pixels)
                image.load()  # decode now: a truncated file fails here
                try:
                    upright = ImageOps.exif_transpose(image)
                except Exception:  # damaged EXIF data: keep the pixels as stored
                    upright = image
                return _normalize(upright if upright is not image else image.copy())
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            found = re.search(r"\((\d+) pixels\)", str(e))  # Pillow's message: "(N pixels)"
            raise _too_large(name, int(found[1]) if found else None) from None
        except UnidentifiedImageError:
            raise ImageError(name, "not an image Pillow can read (PNG, JPEG, ...)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(name, f"a damaged or truncated image ({e})") from None


def _mnist_style(image: Image.Image, image_size: int, ink: float) -> torch.Tensor:
    """(image_size, image_size) in [0, 1]: light ink on black, cropped to the ink, fitted into
    20/28 of the box keeping the aspect ratio, its centre of mass in the middle (as MNIST)."""
    # one float copy of the image, changed in place (a large upload stays a few bytes a pixel)
    x = torch.from_numpy(np.array(image.convert("L"), dtype=np.float32)).div_(255)
    border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])
    if border.median() > 0.5:  # dark ink on a light background
        x, border = x.neg_().add_(1), 1 - border
    x = x.sub_(border.median()).clamp_(min=0)
    if x.max() <= 0:
        raise ImageError("the image", "no digit found: the image is blank")
    x = x.div_(x.max())  # the background at 0, the strongest ink at 1
    rows, cols = (x > ink).any(1).nonzero(), (x > ink).any(0).nonzero()
    x = x[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = x.shape
    scale = image_size * 20 / 28 / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(x[None, None], size=size, mode="bilinear", antialias=True)[0, 0]
    x = x.clamp(0, 1)
    h, w = x.shape
    total = x.sum()
    cy = (x.sum(1) * torch.arange(h)).sum() / total
    cx = (x.sum(0) * torch.arange(w)).sum() / total
    middle = image_size / 2  # where MNIST digits have their centre of mass (14, 14)
    top = min(max(round(middle - float(cy)), 0), image_size - h)
    left = min(max(round(middle - float(cx)), 0), image_size - w)
    out = torch.zeros(image_size, image_size)
    out[top : top + h, left : left + w] = x
    return out


def prepare(
    image: Image.Image,
    channels: int = 1,
    image_size: int = 28,
    style: str = "mnist",
    ink: float = 0.2,
) -> torch.Tensor:
    """A (channels, image_size, image_size) float tensor in [0, 1] for the model.

    ``style="mnist"``: a digit prepared the way MNIST was made (see ``_mnist_style``; ``ink``:
    the fraction of the contrast above the background that counts as ink for the crop), its
    grey repeated over ``channels``. ``style="resize"``: the image in grey (1 channel) or RGB
    (3), resized to image_size x image_size. ``ImageError`` for a blank digit.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: 1 (grey) and 3 (RGB) are supported")
    image = _normalize(image)
    if style == "mnist":
        return _mnist_style(image, image_size, ink)[None].repeat(channels, 1, 1)
    if style == "resize":
        image = image.convert("L" if channels == 1 else "RGB")
        image = image.resize((image_size, image_size), Image.BILINEAR)
        x = torch.from_numpy(np.array(image, dtype=np.float32) / 255)
        return x[None] if channels == 1 else x.permute(2, 0, 1).contiguous()
    raise ValueError(f"style={style!r}: use one of {', '.join(STYLES)}")


def spec(hparams) -> dict:
    """How a checkpoint's model wants its images: ``prepare``'s keyword arguments, read from its
    hyper-parameters (``model.hparams`` or a checkpoint's ``hyper_parameters``); ``ValueError``
    for values ``prepare`` cannot do."""
    how = {
        "channels": hparams.get("channels", 1),
        "image_size": hparams.get("image_size", 28),
        "style": hparams.get("preprocess", "mnist"),
    }
    if how["channels"] not in (1, 3) or how["style"] not in STYLES:
        raise ValueError(
            f"channels={how['channels']!r} and preprocess={how['style']!r}: images can be "
            f"prepared for channels 1 or 3 and preprocess {' or '.join(STYLES)}"
        )
    if not isinstance(how["image_size"], int) or how["image_size"] < 1:
        raise ValueError(f"image_size={how['image_size']!r}: a positive whole number is needed")
    return how


def class_names(hparams) -> list[str]:
    """The class names a checkpoint was trained with (its ``classes``), else the ten digits."""
    return [str(c) for c in hparams.get("classes") or range(10)]
