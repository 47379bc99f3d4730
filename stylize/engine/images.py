"""Decoding, encoding and colour handling with Pillow.

Inputs of every common kind become 8-bit RGB: EXIF orientation is applied;
greyscale, palette, CMYK and 16-bit images are converted; transparent images
are composited over white (the colour a transparent area shows on a page),
so transparent regions do not turn black. Animated images use their first
frame (a warning says so). A pixel limit guards against decompression bombs.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch import Tensor

from stylize.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# Pillow's own bomb check only warns below 2x its limit; we decide ourselves.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Default limit on decoded pixels per input image (about 16k x 16k / 3).
DEFAULT_MAX_INPUT_PIXELS = 89_478_485

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def decode(data: bytes, *, name: str, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> Image.Image:
    """Decode image bytes into an upright 8-bit RGB image.

    ``name`` (a path or URI) appears in every error. Raises ``InputError`` for
    empty data, data that is not an image, truncated files and images whose
    header claims more than ``max_pixels`` pixels (checked before decoding).
    """
    if not data:
        raise InputError(f"{name}: file is empty (0 bytes), expected an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image Pillow can read ({len(data)} bytes)") from None
    except Exception as exc:
        raise InputError(f"{name}: image data is truncated or corrupt (header: {exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InputError(
            f"{name}: image claims {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (possible decompression bomb); shrink it or raise the limit"
        )
    try:
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            log.warning("%s: animated image with %d frames; using the first", name, frames)
        image.seek(0)  # first frame of animated GIF/WebP/APNG
        image.load()
    except Exception as exc:
        raise InputError(f"{name}: image data is truncated or corrupt ({exc})") from None
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the type's range, not by clipping.
        top = 65535.0 if image.mode.startswith("I;16") else max(1, image.getextrema()[1])
        image = image.point(lambda v: v * (255.0 / top)).convert("L")
    elif image.mode == "F":
        lo, hi = image.getextrema()
        image = image.point(lambda v: (v - lo) * (255.0 / max(hi - lo, 1e-12))).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "L" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode != "RGB":
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return image


def format_for(path: str) -> str:
    """The output format ("png", "jpeg", "webp") that a file name's extension asks for."""
    ext = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    if ext not in FORMATS:
        raise ConfigError(
            f"{path}: cannot tell the output format from extension {('.' + ext) if ext else '(none)'}; "
            "use .png, .jpg/.jpeg or .webp"
        )
    return "jpeg" if ext == "jpg" else ext


def encode(image: Image.Image, fmt: Literal["png", "jpeg", "webp"] = "png", *, quality: int = 95) -> bytes:
    """Encode an RGB image as PNG, JPEG or WebP bytes."""
    buffer = io.BytesIO()
    pil_format = FORMATS[fmt]
    if pil_format == "PNG":
        image.save(buffer, pil_format, optimize=False, compress_level=6)
    elif pil_format == "JPEG":
        image.save(buffer, pil_format, quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        image.save(buffer, pil_format, quality=quality, method=4)
    return buffer.getvalue()


def fit_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(w, h) scaled so the longest side is ``longest``, aspect ratio kept, each side >= 1."""
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize with a filter that neither aliases when shrinking nor blurs much when growing."""
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS if size[0] < image.size[0] else Image.Resampling.BICUBIC)


def to_tensor(image: Image.Image, device: torch.device | str = "cpu") -> Tensor:
    """RGB Pillow image -> float32 tensor (1, 3, h, w) in 0-1."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, h, w)
    return x.unsqueeze(0).to(device=device, dtype=torch.float32).div_(255.0)


def to_image(x: Tensor) -> Image.Image:
    """Tensor (1, 3, h, w) or (3, h, w) in 0-1 -> RGB Pillow image (clamped, rounded)."""
    if x.dim() == 4:
        x = x[0]
    arr = x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu()
    return Image.fromarray(arr.numpy(), "RGB")  # (h, w, 3) uint8


# YIQ (NTSC) as used by Gatys et al. 2016 for luminance-only transfer.
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]]
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def rgb_to_yiq(x: Tensor) -> Tensor:
    """(b, 3, h, w) RGB -> YIQ; Y is luminance, I and Q carry the colour."""
    return torch.einsum("ij,bjhw->bihw", _RGB_TO_YIQ.to(x), x)


def yiq_to_rgb(x: Tensor) -> Tensor:
    """(b, 3, h, w) YIQ -> RGB."""
    return torch.einsum("ij,bjhw->bihw", _YIQ_TO_RGB.to(x), x)
