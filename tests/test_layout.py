"""Photos of different shapes in one batch: each output is the one it gets alone."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from stylize.engine import images
from stylize.engine.layout import Layout
from stylize.engine.optimize import Engine
from stylize.engine.settings import Settings
from stylize.errors import ConfigError, InputError

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def engine():
    return Engine("cpu")


@pytest.fixture(scope="module")
def starry():
    return Image.open(DATA / "starry_night.jpg").convert("RGB")


@pytest.fixture(scope="module")
def photos():
    """A landscape, a portrait, an odd crop and a square: 64x42, 42x64, 64x39 and 64x64 at size 64."""
    cat = Image.open(DATA / "chelsea.png").convert("RGB")
    astronaut = Image.open(DATA / "astronaut.png").convert("RGB")
    ship = Image.open(DATA / "shipwreck.jpg").convert("RGB").crop((5, 10, 105, 71))
    return [cat, astronaut.rotate(90).crop((20, 0, 105, 128)), ship, astronaut]


def small(**kw):
    base = dict(size=64, iterations=5, scales=1, tolerance=0, precision="float32")
    base.update(kw)
    return Settings(**base)


def test_layout_pads_to_the_largest_side_and_crops_back():
    layout = Layout((((32, 21), (64, 42)), ((21, 32), (42, 64))))
    assert layout.mixed and layout.levels == 2
    assert layout.padded(0) == (32, 32) and layout.padded(1) == (64, 64)
    assert layout.valid(1).sizes == ((42, 64), (64, 42))  # (h, w)
    a, b = torch.rand(1, 3, 42, 64), torch.rand(1, 3, 64, 42)
    batch = layout.pad([a, b], 1)
    assert batch.shape == (2, 3, 64, 64)
    assert batch[0, :, 42:].abs().sum() == 0 and batch[1, :, :, 42:].abs().sum() == 0
    assert torch.equal(layout.crop(batch, 0, 1), a) and torch.equal(layout.crop(batch, 1, 1), b)
    one = Layout((((64, 42),), ((64, 42),)))
    assert not one.mixed and one.valid(0) is None
    with pytest.raises(ConfigError, match="level count"):
        Layout((((64, 42),), ((32, 21), (64, 42))))


def assert_as_alone(engine, contents, starry, s, batch):
    """Each result of ``batch`` against the same image run alone: size exact, losses and pixels close."""
    for content, got in zip(contents, batch):
        alone = engine.run(content, [starry], s)
        assert got.image.size == alone.image.size and got.sizes == alone.sizes
        assert got.pixels.shape == alone.pixels.shape
        assert [r.iteration for r in got.records] == [r.iteration for r in alone.records]
        assert got.stopped_early == alone.stopped_early
        # Padding changes how the batch's sums are blocked, so float32 rounding differs; L-BFGS carries that
        # along, most visibly at an overshooting step. The coarsest level's records stay close; the finished
        # images are judged, as the issue asks, within 2%.
        first = [(r.total, a.total) for r, a in zip(got.records, alone.records) if r.scale == 1]
        assert [t for t, _ in first] == pytest.approx([t for _, t in first], rel=2e-2)
        judged = engine.judge(got.image, content, [starry], s, size=64)
        for part, value in engine.judge(alone.image, content, [starry], s, size=64).items():
            assert judged[part] == pytest.approx(value, rel=2e-2, abs=1e-6 * judged["total"]), part
        diff = (images.to_tensor(got.image) - images.to_tensor(alone.image)).abs()
        assert diff.mean() < 1 / 255


@pytest.mark.parametrize("extra", [
    {}, {"preserve_color": True}, {"init": "random", "seed": 3}, {"optimizer": "adam"},
    {"tolerance": 0.2, "tolerance_window": 2}, {"size": 128, "scales": 2, "iterations": 4},
], ids=["plain", "preserve-color", "random-init", "adam", "early-stop", "two-levels"])
def test_mixed_shapes_batched_give_each_image_its_output_alone(engine, photos, starry, extra):
    s = small(**extra)
    contents = photos[:3] if not extra else photos[:2]  # three shapes, or a landscape and a portrait
    seen = []
    batch = engine.run_batch(contents, [starry], s, callback=lambda i, record: seen.append((i, record)))
    assert len({b.sizes[-1] for b in batch}) == len(contents)
    for i, got in enumerate(batch):
        assert got.batch == len(contents)
        assert got.padded_sizes == [(n, n) for n in ((64,) if s.scales == 1 else (64, 128))]
        assert [r for j, r in seen if j == i] == got.records
    assert_as_alone(engine, contents, starry, s, batch)


def test_mixed_shapes_through_the_autograd_reference(photos, starry):
    """The unfused objective (what torch.compile traces) masks the same way."""
    engine = Engine("cpu", fused=False)
    s = small(iterations=5)
    assert_as_alone(engine, photos[:2], starry, s, engine.run_batch(photos[:2], [starry], s))


def test_one_shape_is_not_padded(engine, photos, starry):
    cat = photos[0]
    batch = engine.run_batch([cat, cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], [starry], small(iterations=2))
    assert [b.padded_sizes for b in batch] == [[(64, 42)], [(64, 42)]] and batch[0].batch == 2


def test_a_mixed_batch_that_needs_tiles_runs_one_by_one(engine, photos, starry):
    """Tiles and padding do not mix: each image runs alone, tiled, and is reported under its position."""
    s = small(tile=32, iterations=2, content_layers=["relu2_1"], style_layers=["relu1_1", "relu2_1"])
    seen = []
    batch = engine.run_batch(photos[:2], [starry], s, callback=lambda i, record: seen.append(i))
    assert seen == [0] * 3 + [1] * 3
    for content, got in zip(photos[:2], batch):
        alone = engine.run(content, [starry], s)
        assert got.batch == 1 and got.padded_sizes == got.sizes == alone.sizes
        assert got.memory[0]["tile"] == 32
        assert got.image.tobytes() == alone.image.tobytes()  # the same run


def test_an_unusable_photo_in_a_mixed_batch_is_named(engine, photos, starry):
    """The batch is refused before any work, naming the photo; the flow then runs its jobs one by one
    (flows.catalog.stylize_jobs), so only that job fails."""
    tiny = photos[0].resize((40, 12))
    with pytest.raises(InputError, match="40x12 px"):
        engine.run_batch([photos[1], tiny], [starry], small())


def test_a_mixed_batch_of_prints_gives_each_image_its_print_alone(engine, photos, starry, monkeypatch):
    """The print schedule scaled down (previews of 64 px, prints above 128 px): each image's levels above its
    preview match that preview's terms on the image shrunk to its own size there, not to the padded batch's."""
    from stylize.engine import schedule

    monkeypatch.setattr(schedule, "PRINT_BASE", 64)
    monkeypatch.setattr(schedule, "PRINT_FROM", 128)
    s = small(size=256, iterations=4, scales=1)
    batch = engine.run_batch(photos[:2], [starry], s)
    assert [lv["anchor"] for lv in batch[0].memory] == [None, [64, 64], [64, 64]]  # the padded previews
    assert_as_alone(engine, photos[:2], starry, s, batch)
