"""Decoding every common kind of input into upright 8-bit RGB, and clear errors for bad ones."""

import io
import subprocess
import sys
import time

import pytest
from PIL import Image, ImageCms

from stylize.engine import images
from stylize.errors import ConfigError, InputError


def encode(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(size=(40, 30)):
    im = Image.new("RGB", size, (200, 30, 40))
    im.paste((20, 200, 60), (0, 0, size[0] // 2, size[1]))
    return im


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"this is not an image", "not an image"),
        (encode(photo((64, 64)), "JPEG")[:300], "truncated or corrupt"),
        (encode(photo((64, 64)), "PNG")[:80], "truncated or corrupt"),
    ],
    ids=["zero-bytes", "not-an-image", "truncated-jpeg", "truncated-png"],
)
def test_bad_bytes_give_one_clear_error(data, match):
    with pytest.raises(InputError, match=match) as err:
        images.decode(data, name="s3://bucket/in/x.jpg")
    assert "s3://bucket/in/x.jpg" in str(err.value)


def test_decompression_bomb_refused_before_decoding():
    bomb = encode(Image.new("1", (12000, 12000)), "PNG")  # tiny file, 144 Mpx
    assert len(bomb) < 100_000
    with pytest.raises(InputError, match="12000x12000.*decompression bomb"):
        images.decode(bomb, name="bomb.png")
    with pytest.raises(InputError, match="over the limit of 100"):
        images.decode(encode(photo(), "PNG"), name="p.png", max_pixels=100)


@pytest.mark.parametrize(
    "make",
    [
        lambda: photo().convert("L"),
        lambda: photo().convert("CMYK"),
        lambda: photo().convert("P"),
        lambda: Image.new("I;16", (40, 30), 65535),
    ],
    ids=["grey", "cmyk", "palette", "16-bit"],
)
def test_modes_become_rgb(make):
    src = make()
    fmt = "JPEG" if src.mode == "CMYK" else "PNG"
    out = images.decode(encode(src, fmt), name="x")
    assert out.mode == "RGB" and out.size == (40, 30)


def test_16_bit_white_stays_white():
    out = images.decode(encode(Image.new("I;16", (4, 4), 65535), "PNG"), name="x")
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_alpha_is_composited_over_white():
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    out = images.decode(encode(im, "PNG"), name="x")
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 255)


def test_palette_with_transparency():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    data = encode(im, "PNG", transparency=0)
    out = images.decode(data, name="x")
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 255, 0)


def test_exif_rotation_is_applied():
    im = photo((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    out = images.decode(encode(im, "JPEG", exif=exif.tobytes()), name="x")
    assert out.size == (20, 40)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = images.decode(buf.getvalue(), name="x.gif")
    r, g, b = out.getpixel((4, 4))
    assert r > 200 and b < 50


@pytest.mark.parametrize("path, fmt", [("a.png", "png"), ("a.JPG", "jpeg"), ("d/a.jpeg", "jpeg"), ("a.webp", "webp")])
def test_format_from_extension(path, fmt):
    assert images.format_for(path) == fmt


@pytest.mark.parametrize("path", ["a.gif", "noext", "dir.png/file"])
def test_unknown_output_extension(path):
    with pytest.raises(ConfigError, match="extension"):
        images.format_for(path)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_roundtrip(fmt):
    data = images.encode(photo(), fmt, quality=90)
    back = images.decode(data, name="x")
    assert back.size == (40, 30)
    assert Image.open(io.BytesIO(data)).format == images.FORMATS[fmt]


def test_tensor_roundtrip_is_exact():
    im = photo()
    assert images.to_image(images.to_tensor(im)).tobytes() == im.tobytes()


def test_yiq_roundtrip():
    x = images.to_tensor(photo())
    back = images.yiq_to_rgb(images.rgb_to_yiq(x))
    assert (back - x).abs().max() < 1e-5


def linear_rgb_profile() -> bytes:
    """A minimal ICC v2 display profile: sRGB's primaries with a linear tone curve (gamma 1.0).

    A pixel value v in it means linear light v, which sRGB encodes as about
    v ** (1 / 2.2): mid-grey 128 becomes about 188, so the conversion is plain to see.
    """
    import struct

    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(x, y, z):
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, 0x0100) + b"\0\0"  # gamma 1.0, padded to 4 bytes
    tags = [(b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
            (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)), (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + b"\0" * 12
              + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_embedded_icc_profile_is_converted_to_srgb(fmt):
    im = Image.new("RGB", (8, 8), (128, 128, 128))
    decoded = images.decode(encode(im, fmt, icc_profile=linear_rgb_profile()), name="linear.img")
    r, g, b = decoded.getpixel((4, 4))
    # linear 128/255 = 0.502 -> sRGB 0.735 = 187.5
    assert abs(r - 188) <= 2 and abs(g - 188) <= 2 and abs(b - 188) <= 2
    assert "icc_profile" not in decoded.info
    # Without a profile the pixels are taken as sRGB, untouched.
    assert images.decode(encode(im, fmt), name="plain.img").getpixel((4, 4)) == (128, 128, 128)


def test_unusable_icc_profile_warns_and_keeps_pixels(caplog):
    im = Image.new("RGB", (8, 8), (128, 128, 128))
    decoded = images.decode(encode(im, "PNG", icc_profile=b"not a profile at all" * 8), name="bad-icc.png")
    assert decoded.getpixel((0, 0)) == (128, 128, 128)
    assert "bad-icc.png" in caplog.text and "ICC profile" in caplog.text


def read_png16(data: bytes):
    """The 16-bit samples of a PNG written with filter type 0 (as ``images`` writes them), (h, w, 3)."""
    import struct
    import zlib

    import numpy as np

    pos, idat, size = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h, depth, colour = size
    assert (depth, colour) == (16, 2)
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * 6)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].copy().view(">u2").reshape(h, w, 3)


@pytest.mark.parametrize("fmt", ["png16", "tiff"])
def test_16_bit_output_round_trips(fmt):
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 24, 40, generator=gen)
    data = images.encode(x, fmt, dpi=300)
    expected = x[0].mul(65535).round().to(torch.int32).permute(1, 2, 0).numpy()  # (h, w, 3)
    if fmt == "png16":
        samples = read_png16(data).astype(np.int32)
    else:  # one uncompressed strip at the end of the file
        samples = np.frombuffer(data[-24 * 40 * 6:], "<u2").reshape(24, 40, 3).astype(np.int32)
    assert (samples == expected).all()
    assert len(np.unique(samples % 256)) > 200  # real 16-bit precision, not 8 bits widened
    # An independent reader (Pillow, which reads 16-bit RGB down to 8 bits) sees the same picture,
    # tagged sRGB at 300 dpi.
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.size == (40, 24) and im.mode == "RGB"
    assert (np.asarray(im).astype(np.int32) - (expected >> 8)).__abs__().max() <= 1
    assert im.info["icc_profile"] == images.srgb_profile()
    assert round(im.info["dpi"][0]) == 300


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_8_bit_outputs_are_tagged_srgb(fmt):
    im = Image.open(io.BytesIO(images.encode(photo(), fmt, dpi=150)))
    assert im.info["icc_profile"] == images.srgb_profile()
    if fmt != "webp":  # WebP has no resolution field
        assert round(im.info["dpi"][0]) == 150


def test_the_srgb_tag_is_the_same_in_every_process():
    # LittleCMS dates the profiles it makes; outputs written in another process (a Dask
    # worker, tomorrow's run) must carry the same bytes.
    code = "from stylize.engine import images; import sys; sys.stdout.buffer.write(images.srgb_profile())"
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    time.sleep(1.1)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert first == second == images.srgb_profile()
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(first))).strip() == "sRGB built-in"
