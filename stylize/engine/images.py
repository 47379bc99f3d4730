"""Decoding, encoding and colour handling with Pillow.

Inputs of every common kind become 8-bit RGB: EXIF orientation is applied;
greyscale, palette, CMYK and 16-bit images are converted; transparent images
are composited over white (the colour a transparent area shows on a page),
so transparent regions do not turn black. Animated images use their first
frame (a warning says so). A pixel limit guards against decompression bombs.

Colour: an input with an embedded ICC profile (Adobe RGB, Display P3, a CMYK
press profile) is converted through it into sRGB, the space VGG19 was trained
on and the one outputs are tagged with, so a wide-gamut photo keeps its
colours instead of looking washed out. Outputs carry an sRGB profile and,
when asked, a DPI. ``png16`` and ``tiff`` write 16 bits per channel from the
optimized float image, so gradients in a large print do not band; Pillow
cannot write 16-bit RGB, so those two are written here (``_png16``,
``_tiff16``): plain, uncompressed-or-deflated baseline files any viewer opens.
"""

from __future__ import annotations

import functools
import io
import logging
import struct
import warnings
import zlib
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError
from torch import Tensor

from stylize.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# Pillow's own bomb check only warns below 2x its limit; we decide ourselves.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Default limit on decoded pixels per input image (about 16k x 16k / 3).
DEFAULT_MAX_INPUT_PIXELS = 89_478_485

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "tiff": "TIFF", "tif": "TIFF",
           "png16": "PNG"}
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "tiff": ".tif", "png16": ".png"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "tiff": "image/tiff",
               "png16": "image/png"}
#: Formats written with 16 bits per channel.
DEEP_FORMATS = ("png16", "tiff")


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
    return to_rgb(to_srgb(image, name=name))


# (year, month, day, hour, minute, second) of the sRGB profile's header, as ICC's dateTimeNumber.
PROFILE_DATE = struct.pack(">6H", 2026, 1, 1, 0, 0, 0)


@functools.cache
def srgb_profile() -> bytes:
    """The ICC profile that outputs are tagged with (LittleCMS's built-in sRGB).

    LittleCMS stamps the profile with the time it was made (header bytes 24-35);
    a fixed date keeps outputs byte-identical from one process to the next.
    """
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return profile[:24] + PROFILE_DATE + profile[36:]


def to_srgb(image: Image.Image, *, name: str = "image") -> Image.Image:
    """Convert an image with an embedded ICC profile into sRGB (perceptual intent); others pass through.

    A profile that cannot be read or does not fit the image's mode is ignored
    with a warning naming ``name``: the pixels are then taken as sRGB, as
    every viewer without colour management would show them.
    """
    icc = image.info.get("icc_profile")
    if not icc:
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    out_mode = {"RGB": "RGB", "RGBA": "RGBA", "CMYK": "RGB", "L": "RGB"}.get(image.mode)
    if out_mode is None:
        log.warning("%s: embedded ICC profile not applied to a %s image; taking its pixels as sRGB", name,
                    image.mode)
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        log.warning("%s: embedded ICC profile unusable (%s); taking its pixels as sRGB", name, exc)
        return image
    converted.info.pop("icc_profile", None)
    return converted


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
    """The output format ("png", "jpeg", "webp", "tiff") that a file name's extension asks for.

    ``png16`` has no extension of its own: ask for it with the format setting.
    """
    ext = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    if ext not in FORMATS or ext == "png16":
        raise ConfigError(
            f"{path}: cannot tell the output format from extension {('.' + ext) if ext else '(none)'}; "
            "use .png, .jpg/.jpeg, .webp or .tif/.tiff"
        )
    return {"jpg": "jpeg", "tif": "tiff"}.get(ext, ext)


def encode(image: Image.Image | Tensor, fmt: str = "png", *, quality: int = 95, dpi: int | None = None) -> bytes:
    """Encode an image as PNG, JPEG, WebP (8-bit) or ``png16``/``tiff`` (16-bit), tagged sRGB.

    ``image`` is a Pillow RGB image or a float tensor (1, 3, h, w) or (3, h, w)
    in 0-1; 16-bit formats keep a tensor's precision (an 8-bit image is
    widened exactly, 255 -> 65535). ``dpi`` is written when given.
    """
    if fmt in DEEP_FORMATS:
        x = image if isinstance(image, Tensor) else to_tensor(image)
        x = x[0] if x.dim() == 4 else x
        # (h, w, 3) uint16: round to the nearest of 65536 levels
        deep = x.detach().float().clamp(0, 1).mul(65535).round().to(torch.int32).permute(1, 2, 0).cpu().numpy()
        deep = deep.astype(np.uint16)
        return _png16(deep, dpi) if fmt == "png16" else _tiff16(deep, dpi)
    if isinstance(image, Tensor):
        image = to_image(image)
    buffer = io.BytesIO()
    pil_format = FORMATS[fmt]
    tags = {"icc_profile": srgb_profile()}
    if dpi:
        tags["dpi"] = (dpi, dpi)
    if pil_format == "PNG":
        image.save(buffer, pil_format, optimize=False, compress_level=6, **tags)
    elif pil_format == "JPEG":
        image.save(buffer, pil_format, quality=quality, subsampling=0 if quality >= 90 else 2, **tags)
    else:
        image.save(buffer, pil_format, quality=quality, method=4, **tags)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png16(pixels: np.ndarray, dpi: int | None) -> bytes:
    """(h, w, 3) uint16 -> a 16-bit RGB PNG with an sRGB iCCP chunk (and pHYs for ``dpi``)."""
    h, w, _ = pixels.shape
    rows = pixels.astype(">u2").reshape(h, w * 6 // 2).view(np.uint8).reshape(h, w * 6)  # big-endian samples
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1)  # filter type 0 (None) per row
    out = [b"\x89PNG\r\n\x1a\n",
           _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)),  # 16 bits, truecolour
           _png_chunk(b"iCCP", b"sRGB\x00\x00" + zlib.compress(srgb_profile()))]
    if dpi:
        ppm = round(dpi / 0.0254)  # pixels per metre
        out.append(_png_chunk(b"pHYs", struct.pack(">IIB", ppm, ppm, 1)))
    out += [_png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)), _png_chunk(b"IEND", b"")]
    return b"".join(out)


def _tiff16(pixels: np.ndarray, dpi: int | None) -> bytes:
    """(h, w, 3) uint16 -> a little-endian baseline RGB TIFF, 16 bits per sample, one uncompressed strip."""
    h, w, _ = pixels.shape
    icc = srgb_profile()
    strip = pixels.astype("<u2").tobytes()
    tags = 13
    ifd_size = 2 + 12 * tags + 4
    bits_at = 8 + ifd_size  # extra data after the IFD: bits per sample, resolutions, profile, pixels
    res_at = bits_at + 6
    icc_at = res_at + 16
    strip_at = icc_at + len(icc) + (len(icc) & 1)  # word-aligned
    res = dpi or 72
    entries = [  # (tag, type, count, value or offset); types: 3 SHORT, 4 LONG, 5 RATIONAL, 7 UNDEFINED
        (256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, bits_at), (259, 3, 1, 1), (262, 3, 1, 2),
        (273, 4, 1, strip_at), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(strip)),
        (282, 5, 1, res_at), (283, 5, 1, res_at + 8), (296, 3, 1, 2), (34675, 7, len(icc), icc_at),
    ]
    ifd = struct.pack("<H", tags) + b"".join(
        struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 and count == 1
                                                 else struct.pack("<I", value))
        for tag, kind, count, value in entries) + struct.pack("<I", 0)
    extra = struct.pack("<HHH", 16, 16, 16) + struct.pack("<IIII", res, 1, res, 1) + icc + b"\x00" * (len(icc) & 1)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + extra + strip


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
