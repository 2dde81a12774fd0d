"""Decode any image file the pipeline meets into a fully loaded 8-bit RGB `PIL.Image`.

Every stage that reads pixels goes through `load_rgb`, so one policy decides what an image
*is*: EXIF orientation applied (the way viewers and the annotators saw it), 16-bit data
scaled to 8 bit, CMYK / grayscale / palette converted, and transparency composited over a
neutral gray (`BACKGROUND`). Compositing (rather than dropping alpha) is deliberate: the RGB
under a fully transparent pixel is arbitrary (often black, sometimes garbage), whereas a gray
close to the CLIP / ImageNet mean becomes ~0 after normalisation, i.e. "nothing there".

Bad input raises `ImageError` with one line naming the file and the reason; stages turn it
into a per-item reject and go on.
"""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from ovdistill.pipeline.errors import OvdError
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor

# Gray near the CLIP mean (0.481, 0.458, 0.408) * 255: transparent pixels normalise to ~0.
BACKGROUND = (123, 117, 104)

# Pixel cap (width * height) checked from the header, before any pixel is decoded.
# 100 MP is far above COCO/LVIS (<= 640 px) or web images, and ~300 MB as RGB.
DEFAULT_MAX_PIXELS = 100_000_000

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageError(OvdError, ValueError):
    """An image cannot be decoded; the message is one line naming the file and the reason."""


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open `path` and return it as a fully decoded, EXIF-transposed RGB image.

    Raises `ImageError` for a missing, unreadable, truncated or corrupt file, an unsupported
    mode, or more than `max_pixels` pixels (checked from the header, nothing decoded)."""
    path = Path(path)
    try:
        fp = open(path, "rb")
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot open ({e.strerror or e})") from None
    with fp:
        return decode_rgb(fp, str(path), max_pixels=max_pixels)


def decode_rgb(data: bytes | io.IOBase, name: str,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`load_rgb` for encoded bytes or an open binary file; `name` labels errors."""
    fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with warnings.catch_warnings():
            # The explicit `max_pixels` check below replaces PIL's warning; PIL still raises
            # DecompressionBombError itself beyond 2x its own global cap.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(
                        f"{name}: {w}x{h} = {w * h} pixels exceeds the cap of {max_pixels} "
                        f"(possible decompression bomb; raise max_pixels if intended)"
                    )
                if w < 1 or h < 1:
                    raise ImageError(f"{name}: empty image ({w}x{h})")
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im, name)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too many pixels, possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format (corrupt or not an image)") \
            from None
    # struct.error: some PIL plugins raise it on garbage headers.
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"{name}: corrupt or truncated image ({reason})") from None


def to_rgb(im: Image.Image, name: str = "<image>") -> Image.Image:
    """Convert a decoded image of any PIL mode to 8-bit RGB (a new, loaded image).

    16-bit modes (I;16*, and I, taken as 16-bit data as PIL decodes 16-bit PNG/TIFF) are
    scaled by 255/65535; modes with alpha, and palette / gray images with a transparency
    key, are composited over `BACKGROUND`."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(im).astype(np.float32)
        arr = np.clip(arr, 0, 65535) * (255.0 / 65535.0)
        return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.asarray(im, dtype=np.float32), 0, 255)
        return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    try:
        if has_alpha:
            rgba = im.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return im.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{name}: unsupported image mode {mode} ({e})") from None


def to_uint8_tensor(im: Image.Image) -> torch.Tensor:
    """RGB `PIL.Image` -> Tensor[3, H, W] uint8."""
    return pil_to_tensor(im)


def to_float_tensor(im: Image.Image) -> torch.Tensor:
    """RGB `PIL.Image` -> Tensor[3, H, W] float32 in [0, 1] (what torchvision detectors take)."""
    return pil_to_tensor(im).float().div_(255.0)
