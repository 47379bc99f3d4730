"""Bad input in a catalog: each bad job fails with one clear error, the batch goes on,
and every kind of good-but-unusual image completes."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from stylize.engine import images
from stylize.app.cli import main

DATA = Path(__file__).parent.parent / "data"
FAST = {"size": 32, "iterations": 2, "scales": 1, "precision": "float32"}


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(size=(48, 36)) -> Image.Image:
    image = Image.new("RGB", size, (200, 40, 40))
    image.paste((30, 160, 60), (0, 0, size[0] // 2, size[1] // 2))
    return image


def inputs() -> dict[str, bytes]:
    """File name -> bytes for every kind of input the catalog meets."""
    palette = Image.new("P", (48, 36), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, 24, 36))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotate 90 degrees clockwise)
    gif = io.BytesIO()
    frames = [Image.new("RGB", (48, 36), c) for c in ((230, 20, 20), (20, 20, 230))]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "good.png": encoded(photo(), "PNG"),
        "empty.png": b"",
        "notes.jpg": b"these are notes, not a picture\n",
        "cut.jpg": encoded(photo((64, 64)), "JPEG")[:300],
        "cut.png": encoded(photo((64, 64)), "PNG")[:80],
        "bomb.png": encoded(Image.new("1", (12000, 12000)), "PNG"),  # 10 KB claiming 144 Mpx
        "dot.png": encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "grey.png": encoded(photo().convert("L"), "PNG"),
        "cmyk.jpg": encoded(photo().convert("CMYK"), "JPEG"),
        "deep.png": encoded(Image.new("I;16", (48, 36), 40000), "PNG"),
        "palette.png": encoded(palette, "PNG", transparency=0),
        "anim.gif": gif.getvalue(),
        "rotated.jpg": encoded(photo((48, 24)), "JPEG", exif=exif.tobytes()),
    }


BAD = {  # job name -> what its error must say
    "missing__starry": "missing.png: no such file",
    "empty__starry": "file is empty (0 bytes)",
    "notes__starry": "not an image Pillow can read",
    "cut__starry": "truncated or corrupt",  # the JPEG
    "cut-png": "truncated or corrupt",
    "bomb__starry": "claims 12000x12000 = 144000000 pixels, over the limit",
    "dot__starry": "content image is 1x1 px; the layers up to relu5_1 need at least 16 px",
    "huge": "pairs[7].settings: size 20000 needs up to 400000000 pixels, over the budget max_pixels=16777216; "
            "use size <= 4096",
    "one-style-missing": "pairs[8].style[1]: ",
    "nan-weights": "pairs[9].style_weights[0]: Input should be a finite number, found nan",
    "inf-weight": "pairs[10].settings.style_weight: Input should be a finite number, found inf",
    "diverges": "loss became",
}
GOOD = ["grey__starry", "cmyk__starry", "deep__starry", "palette__starry", "anim__starry", "rotated__starry"]


@pytest.fixture
def warnings():
    """Messages of the warnings stylize.engine.images logs (Prefect reconfigures the root logger
    during a run, so caplog's handler there would miss them)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("stylize.engine.images")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def test_each_bad_input_fails_its_own_job_with_one_clear_error(tmp_path, capsys, warnings):
    root = tmp_path / "catalog"
    (root / "in").mkdir(parents=True)
    for name, data in inputs().items():
        (root / "in" / name).write_bytes(data)
    shutil.copy(DATA / "starry_night.jpg", root / "starry.jpg")
    manifest = root / "manifest.yaml"
    manifest.write_text(f"""
version: 1
output: out
defaults: {json.dumps(FAST)}
pairs:
  - {{content: in/missing.png, style: starry.jpg}}
  - {{content: in/empty.png, style: starry.jpg}}
  - {{content: in/notes.jpg, style: starry.jpg}}
  - {{content: in/cut.jpg, style: starry.jpg}}
  - {{content: in/cut.png, style: starry.jpg, name: cut-png}}
  - {{content: in/bomb.png, style: starry.jpg}}
  - {{content: in/dot.png, style: starry.jpg}}
  - {{content: in/good.png, style: starry.jpg, name: huge, settings: {{size: 20000}}}}
  - {{content: in/good.png, style: [starry.jpg, in/missing-style.jpg], name: one-style-missing}}
  - {{content: in/good.png, style: [starry.jpg, starry.jpg], style_weights: [.nan, 1], name: nan-weights}}
  - {{content: in/good.png, style: starry.jpg, name: inf-weight, settings: {{style_weight: .inf}}}}
  - {{content: in/good.png, style: starry.jpg, name: diverges, settings: {{optimizer: adam, learning_rate: 1.0e+30}}}}
  - {{content: in/grey.png, style: starry.jpg}}
  - {{content: in/cmyk.jpg, style: starry.jpg}}
  - {{content: in/deep.png, style: starry.jpg}}
  - {{content: in/palette.png, style: starry.jpg}}
  - {{content: in/anim.gif, style: starry.jpg}}
  - {{content: in/rotated.jpg, style: starry.jpg}}
""")
    # validate lists the problems it can see without running, each with its field path.
    assert main(["validate", str(manifest)]) == 2
    reported = capsys.readouterr().err
    for fragment in ("pairs[0].content: ", "missing.png: not found", "pairs[7].settings: size 20000",
                     "pairs[8].style[1]: ", "pairs[9].style_weights[0]: ", "pairs[10].settings.style_weight: "):
        assert fragment in reported, reported

    # The run does every job, good ones complete, and the summary names each failure and why.
    assert main(["run", str(manifest), "--quiet"]) == 1
    printed = capsys.readouterr().out
    out = root / "out"
    [summary_file] = (out / "_runs").glob("*.json")
    summary = json.loads(summary_file.read_text())
    assert summary["counts"] == {"done": len(GOOD), "skipped": 0, "failed": len(BAD), "total": len(GOOD) + len(BAD)}
    failures = {f["job"]: f["error"] for f in summary["failures"]}
    assert set(failures) == set(BAD)
    for job, fragment in BAD.items():
        assert fragment in failures[job], (job, failures[job])
        assert "\n" not in failures[job]
        assert f"failed {job}: " in printed
        assert not (out / f"{job}.json").exists() and not (out / f"{job}.png").exists()
    assert "missing-style.jpg: no such file" in failures["one-style-missing"]

    outputs = {name: images.decode((out / f"{name}.png").read_bytes(), name=name) for name in GOOD}
    for name in GOOD:
        assert json.loads((out / f"{name}.json").read_text())["output"]["size"] == (out / f"{name}.png").stat().st_size
    assert outputs["rotated__starry"].size == (16, 32)  # upright: the EXIF rotation was applied
    assert outputs["grey__starry"].size == outputs["cmyk__starry"].size == (32, 24)
    r, g, b = outputs["anim__starry"].resize((1, 1)).getpixel((0, 0))
    assert r > b  # the first (red) frame, not the blue second one, and the log says so:
    assert any(m.endswith("anim.gif: animated image with 2 frames; using the first") for m in warnings)


def test_a_manifest_without_pairs_is_refused_clearly(tmp_path, capsys):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("version: 1\noutput: out\npairs: []\n")
    assert main(["run", str(manifest)]) == 2
    assert "no jobs: `pairs` is an empty list and there is no `grid`; add at least one pair" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

