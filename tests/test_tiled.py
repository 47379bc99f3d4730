"""The tiled objective against the whole-image one: same losses, same gradient, tile by tile."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from stylize.engine import fused, images
from stylize.engine.losses import gram
from stylize.engine.objective import Objective, run_features
from stylize.engine.optimize import Engine
from stylize.engine.settings import Settings
from stylize.engine.tiled import (halo_for, layer_geometry, plan_tiles, tiled_feature_losses, tiled_features,
                                  tiled_grams)
from stylize.errors import ConfigError

DATA = Path(__file__).parent / "data"
#: Relative gradient error allowed (largest difference over largest value). Exact tiling measures 1e-6
#: (float32 sums in another order); a halo 16 px short of relu5_1's reach 3e-6, 32 px short 2e-5.
GRAD_TOL = 5e-6


def test_receptive_field_of_relu5_1():
    # The literature's figure: relu5_1 sees 156 px, 70 px beyond its 16 px cell on each side.
    assert layer_geometry("relu5_1") == (156, 16, 70)
    assert layer_geometry("relu1_1") == (3, 1, 1)
    assert halo_for(Settings().style_layers) == (80, 16)


def test_plan_owns_every_pixel_once():
    plan = plan_tiles(200, 330, 96, Settings().style_layers)
    owned = torch.zeros(200, 330, dtype=torch.int32)
    for t in plan.tiles:
        y0, y1, x0, x1 = t.core
        oy0, oy1, ox0, ox1 = t.outer
        owned[y0:y1, x0:x1] += 1
        assert oy0 % 16 == 0 and ox0 % 16 == 0 and y0 % 16 == 0 and x0 % 16 == 0
        assert oy0 == max(0, y0 - 80) and oy1 == min(200, y1 + 80)
    assert owned.eq(1).all()
    assert len(plan.tiles) == 3 * 4


@pytest.mark.parametrize("core", [0, 40, 100])
def test_core_must_be_a_multiple_of_the_stride(core):
    with pytest.raises(ConfigError, match=r"tile is .* multiple of 16 px"):
        plan_tiles(200, 200, core, Settings().style_layers)


def blended_grams(model, styles: list[torch.Tensor], s: Settings) -> dict[str, torch.Tensor]:
    """{layer: (1, c, c)} Grams of several style images mixed by ``s.style_blend`` (default equal)."""
    out: dict[str, torch.Tensor] = {}
    for style, w in zip(styles, s.blend(len(styles))):
        for n, f in run_features(model, style, s.style_layers, torch.float32, True).items():
            out[n] = out[n] + w * gram(f) if n in out else w * gram(f)
    return out


def whole_and_tiled(s: Settings, x: torch.Tensor, content: torch.Tensor, style, core: int):
    """(losses, gradient) of the untiled reference (autograd) and of the tiled objective.

    ``style`` is one style image or a list of them (blended by ``s.style_blend``).
    """
    engine = Engine("cpu")
    model, dtype = engine.features(s), engine.dtype(s)
    rgb_content = content.expand(-1, 3, -1, -1)
    content_feats = run_features(model, rgb_content, s.content_layers, dtype, True)
    grams = blended_grams(model, style if isinstance(style, list) else [style], s)
    objective = Objective(model, s, content_feats, grams, dtype, True, fused=False)
    ref_x = x.clone().requires_grad_(True)
    _total, ref_content, ref_style, _tv = objective(ref_x)
    weights = torch.arange(1.0, x.shape[0] + 1)  # per-image upstream weights
    ((ref_content + ref_style) * weights).sum().backward()

    plan = plan_tiles(x.shape[-2], x.shape[-1], core, s.content_layers + s.style_layers)
    assert len(plan.tiles) > 1
    # The content targets themselves come from tiles too, as in a print-size run.
    tiled_targets = tiled_features(model, rgb_content, s.content_layers, plan, True)
    for n in s.content_layers:
        assert_rel_close(tiled_targets[n], content_feats[n], 1e-5)
    spec = Objective(model, s, tiled_targets, grams, dtype, True).spec
    tiled_x = x.clone().requires_grad_(True)
    total, content_loss, style_loss, _tv = tiled_feature_losses(tiled_x, model, spec, plan, True)
    (total * weights).sum().backward()
    return (ref_content.detach(), ref_style.detach(), ref_x.grad), (content_loss, style_loss, tiled_x.grad)


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, tol: float):
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def style_image(name: str, w: int, h: int) -> torch.Tensor:
    return images.to_tensor(images.resize(Image.open(DATA / name).convert("RGB"), (w, h)))


def sample(h: int, w: int, channels: int = 3, batch: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    photo = images.to_tensor(images.resize(Image.open(DATA / "chelsea.png").convert("RGB"), (w, h)))
    content = photo.expand(batch, -1, -1, -1).clone()
    if channels == 1:
        content = images.rgb_to_yiq(content)[:, :1]
    x = (content + 0.1 * torch.randn(content.shape, generator=gen)).clamp(0, 1)
    return x, content, style_image("starry_night.jpg", 176, 144)


CASES = {
    # The default layers: content relu4_2, style relu1_1..relu5_1 (halo 80 px).
    "default": dict(),
    # Content only, style only, and losses on a conv output and a pooling output.
    "content": dict(style_weight=0.0, style_layers=("relu1_1",)),
    "style": dict(content_weight=0.0),
    "odd layers": dict(content_layers=("conv3_1", "relu4_2"), style_layers=("relu1_1", "conv2_1", "pool4",
                                                                           "relu5_1")),
    "avg pooling": dict(pooling="avg"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiled_equals_untiled(case):
    """A 240x208 image in 96 px cores: 3x3 tiles, the middle ones with a halo on every side."""
    s = Settings(size=240, precision="float32", **CASES[case])
    x, content, style = sample(208, 240)
    (ref_c, ref_s, ref_g), (c, st, g) = whole_and_tiled(s, x, content, style, core=96)
    torch.testing.assert_close(c, ref_c, rtol=1e-5, atol=0)
    torch.testing.assert_close(st, ref_s, rtol=1e-5, atol=0)
    assert_rel_close(g, ref_g, GRAD_TOL)
    assert g.abs().sum() > 0


def test_tiled_several_styles():
    """Two paintings blended 0.7/0.3 (a Gram per painting, then mixed): still the same loss and gradient."""
    s = Settings(size=240, precision="float32", style_blend=(0.7, 0.3))
    x, content, starry = sample(208, 240)
    shipwreck = style_image("shipwreck.jpg", 192, 128)
    (ref_c, ref_s, ref_g), (c, st, g) = whole_and_tiled(s, x, content, [starry, shipwreck], core=96)
    torch.testing.assert_close(c, ref_c, rtol=1e-5, atol=0)
    torch.testing.assert_close(st, ref_s, rtol=1e-5, atol=0)
    assert_rel_close(g, ref_g, GRAD_TOL)
    # The blend matters: starry night alone is a different objective.
    (_, alone, _), _ = whole_and_tiled(Settings(size=240, precision="float32"), x, content, starry, core=96)
    assert (alone - ref_s).abs().max() > 1e-3 * ref_s.abs().max()


@pytest.mark.parametrize("styles", [1, 2])
def test_tiled_luminance_batch_of_two(styles):
    """Colour preservation optimizes luminance (one channel) against luminance Grams, with one style or
    two blended; a batch keeps each image's gradient apart."""
    s = Settings(size=192, precision="float32", preserve_color=True, style_blend=(0.5,) * styles)
    x, content, style = sample(160, 192, channels=1, batch=2)
    x[1] = x[1].flip(-1)
    paintings = [style, style_image("shipwreck.jpg", 144, 112)][:styles]
    luminance = [images.rgb_to_yiq(p)[:, :1].expand(-1, 3, -1, -1) for p in paintings]  # as StyleTargets does
    (ref_c, ref_s, ref_g), (c, st, g) = whole_and_tiled(s, x, content, luminance, core=64)
    assert g.shape == (2, 1, 160, 192)
    torch.testing.assert_close(c, ref_c, rtol=1e-5, atol=0)
    torch.testing.assert_close(st, ref_s, rtol=1e-5, atol=0)
    assert_rel_close(g, ref_g, GRAD_TOL)


def test_objective_with_tiles_adds_total_variation():
    """Objective(tiles=...) is what a tiled level runs: its total, TV included, and gradient equal the
    whole-image objective's."""
    s = Settings(size=192, precision="float32", tv_weight=1e7)  # TV ~ 2e5 of a 1.6e6 total
    x, content, style = sample(160, 192)
    engine = Engine("cpu")
    model = engine.features(s)
    feats = run_features(model, content, s.content_layers, torch.float32, True)
    grams = blended_grams(model, [style], s)
    plan = plan_tiles(160, 192, 64, s.content_layers + s.style_layers)
    out = {}
    for name, tiles in (("whole", None), ("tiled", plan)):
        xs = x.clone().requires_grad_(True)
        total, _c, _s, tv = Objective(model, s, feats, grams, torch.float32, True, fused=False, tiles=tiles)(xs)
        total.sum().backward()
        out[name] = (total.detach(), tv.detach(), xs.grad)
    (ref_total, ref_tv, ref_g), (total, tv, g) = out["whole"], out["tiled"]
    assert tv.item() > 0.01 * total.item()  # TV is a real part of the total here
    torch.testing.assert_close(tv, ref_tv, rtol=1e-6, atol=0)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
    assert_rel_close(g, ref_g, GRAD_TOL)


def test_too_small_a_halo_is_not_exact(monkeypatch):
    """The check has teeth: with a halo of 48 px, short of relu5_1's 70 px reach, the gradient is off
    by more than GRAD_TOL. (The outermost pixels of a receptive field count little: 64 px is off by 3e-6.)
    """
    import stylize.engine.tiled as tiled

    s = Settings(size=192, precision="float32", content_weight=0.0)
    x, content, style = sample(160, 192)
    original = tiled.halo_for
    monkeypatch.setattr(tiled, "halo_for", lambda layers: (48, original(layers)[1]))
    _, (_, _, g) = whole_and_tiled(s, x, content, style, core=64)
    monkeypatch.undo()
    _, (_, _, exact) = whole_and_tiled(s, x, content, style, core=64)
    ref_g = exact
    err = ((g - ref_g).abs().max() / ref_g.abs().max()).item()
    assert err > 3 * GRAD_TOL


def test_tiled_grams_equal_whole_image_grams():
    s = Settings(precision="float32")
    model = Engine("cpu").features(s)
    style = images.to_tensor(images.resize(Image.open(DATA / "starry_night.jpg").convert("RGB"), (200, 168)))
    whole = {n: gram(f) for n, f in run_features(model, style, s.style_layers, torch.float32, True).items()}
    tiled = tiled_grams(model, style, s.style_layers, plan_tiles(168, 200, 48, s.style_layers), True)
    for n in s.style_layers:
        assert_rel_close(tiled[n], whole[n], 1e-5)


def test_tiled_run_matches_untiled_run():
    """Three L-BFGS iterations at 192x128, whole image against 64 px tiles: the same picture."""
    content = Image.open(DATA / "chelsea.png").convert("RGB")
    style = Image.open(DATA / "starry_night.jpg").convert("RGB")
    engine = Engine("cpu")
    results = {}
    for tile in (None, 64):
        s = Settings(size=192, iterations=3, scales=1, precision="float32", tile=tile, tolerance=0)
        results[tile] = engine.run(content, [style], s)
    whole, tiled = results[None], results[64]
    assert whole.memory[0]["tile"] is None and tiled.memory[0]["tile"] == 64 and tiled.memory[0]["halo"] == 80
    assert len(tiled.records) == len(whole.records) == 4
    for a, b in zip(whole.records, tiled.records):
        assert abs(a.total - b.total) <= 1e-4 * a.total
    assert whole.records[-1].total < 0.9 * whole.records[0].total  # it did optimize
    assert (tiled.pixels - whole.pixels).abs().max() < 1e-3
    assert tiled.pixels.shape == (3, 128, 192)


@pytest.mark.parametrize("update, field", [
    (dict(max_memory="200MB"), "max_memory"),
    (dict(max_memory="1GiB", tile=512), "max_memory"),
])
def test_budget_below_one_tile_is_refused_before_any_work(update, field):
    from stylize.errors import ResourceError

    content = Image.open(DATA / "chelsea.png").convert("RGB")
    calls = []
    s = Settings(size=2048, iterations=1, scales=1, precision="float32", **update)
    with pytest.raises(ResourceError, match=field) as err:
        Engine("cpu").run(content, [content], s, callback=calls.append)
    assert calls == []
    assert "raise max_memory" in str(err.value)


def test_the_last_tile_of_the_gram_pass_is_not_run_again(monkeypatch):
    """With N tiles an evaluation runs 2N - 1 forward passes: pass 2 starts with the tile pass 1 ended on,
    whose graph it kept; the gradient is still the untiled one (test_tiled_equals_untiled)."""
    s = Settings(size=240, precision="float32")
    x, content, style = sample(208, 240)
    engine = Engine("cpu")
    model = engine.features(s)
    plan = plan_tiles(208, 240, 96, s.content_layers + s.style_layers)
    spec = Objective(model, s, tiled_features(model, content, s.content_layers, plan, True),
                     blended_grams(model, [style], s), torch.float32, True).spec
    calls = []
    forward = fused._Stack.forward  # every tile's pass goes through the fused stack
    monkeypatch.setattr(fused._Stack, "forward", lambda self, *a: calls.append(self.keep) or forward(self, *a))
    tiled_feature_losses(x.clone().requires_grad_(True), model, spec, plan, True)
    assert len(plan.tiles) == 9 and len(calls) == 2 * 9 - 1
    assert calls.count(True) == 9  # each tile once with what its backward needs kept, 8 without
