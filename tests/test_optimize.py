"""The optimization loop on CPU at small sizes."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from stylize.engine import images
from stylize.errors import InputError, OptimizationError
from stylize.engine.lbfgs import BatchedLBFGS
from stylize.engine.optimize import Engine
from stylize.engine.schedule import level_sizes
from stylize.engine.settings import Settings

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def engine():
    return Engine("cpu")


@pytest.fixture(scope="module")
def cat():
    return Image.open(DATA / "chelsea.png").convert("RGB")


@pytest.fixture(scope="module")
def starry():
    return Image.open(DATA / "starry_night.jpg").convert("RGB")


@pytest.fixture(scope="module")
def shipwreck():
    return Image.open(DATA / "shipwreck.jpg").convert("RGB")


def small(**kw):
    base = dict(size=64, iterations=6, scales=1, tolerance=0, precision="float32")
    base.update(kw)
    return Settings(**base)


def test_loss_falls_over_lbfgs_steps(engine, cat, starry):
    seen = []
    result = engine.run(cat, [starry], small(iterations=8), callback=seen.append)
    totals = [r.total for r in result.records]
    assert seen == result.records
    assert [r.iteration for r in result.records] == list(range(9))
    assert totals[-1] < 0.7 * totals[0]
    assert result.image.size == (64, 42)
    for r in result.records:
        assert r.total == pytest.approx(r.content + r.style + r.tv, rel=1e-5)


def test_adam_also_lowers_the_loss(engine, cat, starry):
    result = engine.run(cat, [starry], small(optimizer="adam", iterations=10))
    assert result.records[-1].total < result.records[0].total
    assert result.records[-1].iteration == 10


def test_same_seed_same_output(engine, cat, starry):
    s = small(init="random", seed=7)
    a = engine.run(cat, [starry], s).image.tobytes()
    b = Engine("cpu").run(cat, [starry], s).image.tobytes()
    c = engine.run(cat, [starry], small(init="random", seed=8)).image.tobytes()
    assert a == b
    assert a != c


def test_preserve_color_keeps_content_chroma(engine, cat, starry):
    result = engine.run(cat, [starry], small(preserve_color=True, iterations=8))
    out = images.rgb_to_yiq(images.to_tensor(result.image))
    ref = images.rgb_to_yiq(images.to_tensor(images.resize(cat, result.image.size)))
    # Chroma (I, Q) is the content's, up to 8-bit rounding and clipping at the gamut edge.
    diff = (out[:, 1:] - ref[:, 1:]).abs()
    assert diff.median() < 0.01
    # ...while the luminance did change.
    assert (out[:, :1] - ref[:, :1]).abs().mean() > 0.01
    # Without it the colours move towards the painting's.
    plain = images.rgb_to_yiq(images.to_tensor(engine.run(cat, [starry], small(iterations=8)).image))
    assert (plain[:, 1:] - ref[:, 1:]).abs().median() > diff.median()


def test_blend_one_zero_equals_single_style(engine, cat, starry, shipwreck):
    single = engine.run(cat, [starry], small())
    blended = engine.run(cat, [starry, shipwreck], small(style_blend=(1.0, 0.0)))
    assert blended.image.tobytes() == single.image.tobytes()
    assert [r.total for r in blended.records] == pytest.approx([r.total for r in single.records], rel=1e-6)
    mixed = engine.run(cat, [starry, shipwreck], small(style_blend=(0.5, 0.5)))
    assert mixed.image.tobytes() != single.image.tobytes()


def test_style_targets_are_reusable(engine, cat, starry):
    targets = engine.style_targets([starry], small())
    first = engine.run(cat, targets, small())
    grams = targets.grams(64)
    again = engine.run(cat, targets, small())
    assert targets.grams(64) is grams  # computed once for this size
    assert first.image.tobytes() == again.image.tobytes()


def test_multiscale_runs_coarse_then_full(engine, cat, starry):
    result = engine.run(cat, [starry], small(size=128, scales=2, iterations=3))
    assert result.sizes == [(64, 42), (128, 85)]
    assert {r.scale for r in result.records} == {1, 2}
    assert result.image.size == (128, 85)
    # Coarse levels below 64 px are dropped rather than run at useless sizes.
    assert level_sizes(128, 85, small(size=128, scales=4)) == [(64, 42), (128, 85)]


def test_early_stopping_ends_a_plateau(engine, cat, starry):
    result = engine.run(cat, [starry], small(iterations=50, tolerance=0.9, tolerance_window=2))
    assert result.stopped_early == [True]
    assert len(result.records) < 20


def test_snapshots_every_n(engine, cat, starry):
    shots = []
    engine.run(cat, [starry], small(iterations=6, save_every=2), snapshot=lambda i, s, im: shots.append((i, s, im.size)))
    assert [i for i, _, _ in shots] == [2, 4, 6]


def test_zero_iterations_returns_the_start(engine, cat, starry):
    result = engine.run(cat, [starry], small(iterations=0))
    assert len(result.records) == 1
    expected = images.to_image(images.to_tensor(images.resize(cat, (64, 42))))
    assert result.image.tobytes() == expected.tobytes()


def test_nan_loss_stops_with_clear_error(engine, cat, starry):
    with pytest.raises(OptimizationError, match="loss became (nan|inf) at iteration"):
        engine.run(cat, [starry], small(optimizer="adam", learning_rate=1e30, iterations=5))


def test_too_small_content_is_rejected(engine, starry):
    tiny = Image.new("RGB", (8, 8), "red")
    with pytest.raises(InputError, match="8x8 px.*at least 16 px"):
        engine.run(tiny, [starry], small())


def test_bfloat16_path_close_to_float32(engine, cat, starry):
    f32 = engine.run(cat, [starry], small(iterations=3))
    bf16 = engine.run(cat, [starry], small(iterations=3, precision="bfloat16"))
    assert bf16.precision == "bfloat16"
    # Same starting point: the losses agree to bf16 accuracy.
    assert bf16.records[0].style == pytest.approx(f32.records[0].style, rel=0.05)


def test_batched_lbfgs_equals_per_image():
    torch.manual_seed(0)
    n = 20
    mats = [torch.randn(n, n) for _ in range(3)]
    mats = [m @ m.T / n + 0.1 * torch.eye(n) for m in mats]
    targets = [torch.randn(n) for _ in range(3)]

    def solve(indices):
        x = torch.zeros(len(indices), n, requires_grad=True)

        def evaluate():
            return torch.stack([
                (0.5 * x[j] @ mats[i] @ x[j] - targets[i] @ x[j]) * (10.0 ** i) for j, i in enumerate(indices)
            ])

        opt = BatchedLBFGS(x)
        opt.start(evaluate)
        for _ in range(40):
            opt.step(evaluate)
        return x.detach()

    together = solve([0, 1, 2])
    for i in range(3):
        torch.testing.assert_close(together[i], solve([i])[0], rtol=1e-5, atol=1e-6)
    # And it actually solved the problems.
    torch.testing.assert_close(together[0], torch.linalg.solve(mats[0], targets[0]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("extra", [{}, {"preserve_color": True}, {"tolerance": 0.2, "tolerance_window": 2}],
                         ids=["plain", "preserve-color", "early-stop"])
def test_batch_equals_each_image_alone(engine, cat, starry, extra):
    """Batching changes speed, not pictures: each image of a batch ends where it would alone."""
    other = cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT).point(lambda v: 255 - v)
    s = small(iterations=8, **extra)
    batch = engine.run_batch([cat, other], [starry], s)
    for image, got in zip([cat, other], batch):
        alone = engine.run(image, [starry], s)
        assert [r.iteration for r in got.records] == [r.iteration for r in alone.records]
        # Convolutions over a batch round differently from one image; L-BFGS
        # carries those float32 differences along, so the match is close, not exact.
        assert [r.total for r in got.records] == pytest.approx([r.total for r in alone.records], rel=1e-2)
        diff = (images.to_tensor(got.image) - images.to_tensor(alone.image)).abs()
        assert diff.mean() < 1 / 255


def test_judge_prefers_the_optimized_image(engine, cat, starry):
    s = small(iterations=8)
    result = engine.run(cat, [starry], s)
    before = engine.judge(cat, cat, [starry], s, size=64)
    after = engine.judge(result.image, cat, [starry], s, size=64)
    assert before["content"] == 0.0  # the photo is its own content
    assert after["total"] < before["total"]
    # The same image judged twice gives the same figure, whatever produced it.
    assert engine.judge(result.image, cat, [starry], small(precision="bfloat16"), size=64) == after


def test_bfloat16_history_still_solves():
    """The history in bfloat16 (a print under a tight budget): pairs stored at 3 digits, the same minimum."""
    torch.manual_seed(0)
    n = 30
    m = torch.randn(n, n)
    mat = m @ m.T / n + 0.1 * torch.eye(n)
    target = torch.randn(n)
    x = torch.zeros(1, n, requires_grad=True)

    def evaluate():
        return (0.5 * x[0] @ mat @ x[0] - target @ x[0]).view(1)

    opt = BatchedLBFGS(x, history=10, history_dtype=torch.bfloat16)
    opt.start(evaluate)
    for _ in range(60):
        opt.step(evaluate)
    assert opt.pairs.dtype == torch.bfloat16
    torch.testing.assert_close(x.detach()[0], torch.linalg.solve(mat, target), rtol=1e-2, atol=1e-2)
