"""Decoding every common kind of input into upright 8-bit RGB, and clear errors for bad ones."""

import io

import pytest
from PIL import Image

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
