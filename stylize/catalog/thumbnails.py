"""Small JPEG thumbnails of each job's output and inputs, for the run report.

A job writes them while it still holds its images, so a report never reads
outputs back: ``OUTPUT/_thumbs/<job name>.jpg`` for the output, and
``OUTPUT/_thumbs/_inputs/<sha256 prefix>.jpg`` for the content photo and the
style images. Inputs are named by their checksum, so a style shared by
10,000 jobs is one file, written by the first job that uses it (later jobs
find it with a stat), and a photo renamed between runs keeps its thumbnail.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

from PIL import Image

from stylize.catalog.storage import Storage, child

__all__ = ["THUMBS", "SIDE", "output_thumb", "input_thumb", "encode_thumbnail", "write_thumbnails"]

THUMBS = "_thumbs"
#: Longest side in pixels: sharp on a contact sheet, about 10-20 kB as JPEG.
SIDE = 256
QUALITY = 82


def output_thumb(name: str) -> str:
    """The output root-relative path of job ``name``'s thumbnail."""
    return f"{THUMBS}/{name}.jpg"


def input_thumb(sha256: str) -> str:
    """The output root-relative path of the thumbnail of the input with this checksum."""
    return f"{THUMBS}/_inputs/{sha256[:32]}.jpg"


def encode_thumbnail(image: Image.Image, side: int = SIDE) -> bytes:
    """JPEG bytes of ``image`` scaled to fit ``side`` x ``side`` (never enlarged)."""
    width, height = image.size
    scale = min(1.0, side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap: box-reduce first, then resample; a 24 Mpx photo takes milliseconds.
    small = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0) if size != image.size else image
    if small.mode != "RGB":
        small = small.convert("RGB")
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


def write_thumbnails(storage: Storage, root: str, name: str, output: Image.Image, content: Image.Image,
                     inputs: Mapping[str, Any], style_bytes: Sequence[bytes]) -> dict[str, Any]:
    """Write job ``name``'s thumbnails below ``root``; returns their root-relative paths.

    ``inputs`` is the job's input description (``{"content": {"sha256"}, "styles":
    [{"sha256"}, ...]}``), ``style_bytes`` the styles' encoded bytes, decoded
    only when their thumbnail does not exist yet. Each write is atomic.
    """
    paths = {"output": output_thumb(name), "content": input_thumb(inputs["content"]["sha256"]),
             "styles": [input_thumb(s["sha256"]) for s in inputs["styles"]]}
    storage.write(child(root, paths["output"]), encode_thumbnail(output), content_type="image/jpeg")
    if not storage.exists(child(root, paths["content"])):
        storage.write(child(root, paths["content"]), encode_thumbnail(content), content_type="image/jpeg")
    for path, spec, data in zip(paths["styles"], inputs["styles"], style_bytes):
        if not storage.exists(child(root, path)):
            from stylize.engine import images  # here: the report's readers import this module without torch

            style = images.decode(data, name=spec.get("uri", "style"))
            storage.write(child(root, path), encode_thumbnail(style), content_type="image/jpeg")
    return paths
