"""The fused VGG pass (hand-written backward) against autograd through the loss modules."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from stylize.engine.losses import gram
from stylize.engine.optimize import Engine, Objective, run_features
from stylize.engine.settings import Settings

DATA = Path(__file__).parent / "data"

# Losses on ReLU outputs (the usual case), on a conv output (its ReLU must not
# run in place) and on a pooling output, in one network.
LAYERS = dict(content_layers=["relu4_2", "conv3_1"], style_layers=["relu1_1", "conv2_1", "relu3_1", "pool4", "relu5_1"])


def evaluate(engine: Engine, settings: Settings, fused: bool, seed: int = 0):
    """Per-image losses and the image gradient of a batch of 2, with different upstream weights."""
    gen = torch.Generator().manual_seed(seed)
    content = torch.rand(2, 3, 48, 64, generator=gen)
    style = torch.rand(1, 3, 40, 56, generator=gen)
    x = (content + 0.1 * torch.randn(content.shape, generator=gen)).clamp(0, 1).requires_grad_(True)
    model, dtype = engine.features(settings), engine.dtype(settings)
    content_feats = run_features(model, content, settings.content_layers, dtype, engine.channels_last)
    style_feats = run_features(model, style, settings.style_layers, dtype, engine.channels_last)
    grams = {n: gram(style_feats[n]) for n in settings.style_layers}
    objective = Objective(model, settings, content_feats, grams, dtype, engine.channels_last, fused)
    total, content_loss, style_loss, tv = objective(x)
    # Weights 1 and 3 per image: each image's gradient must scale with its own weight.
    (total * torch.tensor([1.0, 3.0])).sum().backward()
    return [t.detach() for t in (total, content_loss, style_loss, tv)], x.grad


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, tol: float):
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err <= tol, f"relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_equals_autograd_float32(pooling, channels_last):
    engine = Engine("cpu", channels_last=channels_last)
    s = Settings(size=64, precision="float32", pooling=pooling, **LAYERS)
    (ref_losses, ref_grad), (losses, grad) = evaluate(engine, s, False), evaluate(engine, s, True)
    for ours, ref in zip(losses, ref_losses):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    assert grad.shape == ref_grad.shape
    assert_rel_close(grad, ref_grad, 1e-5)
    assert grad.abs().sum() > 0


def test_fused_equals_autograd_bfloat16():
    engine = Engine("cpu")
    s = Settings(size=64, precision="bfloat16", **LAYERS)
    (ref_losses, ref_grad), (losses, grad) = evaluate(engine, s, False), evaluate(engine, s, True)
    for ours, ref in zip(losses, ref_losses):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)  # the same bf16 forward pass
    # The backward adds gradients in bf16 in another order than autograd does.
    assert_rel_close(grad, ref_grad, 2e-2)


def test_fused_default_layers_and_luminance():
    """Default layers, and a one-channel (luminance) image expanded to grey RGB."""
    engine = Engine("cpu")
    s = Settings(size=64, precision="float32")
    results = []
    for fused in (False, True):
        gen = torch.Generator().manual_seed(3)
        y = torch.rand(1, 1, 40, 48, generator=gen)
        model = engine.features(s)
        feats = run_features(model, y.expand(-1, 3, -1, -1), s.content_layers, torch.float32, True)
        styles = run_features(model, torch.rand(1, 3, 40, 48, generator=gen), s.style_layers, torch.float32, True)
        objective = Objective(model, s, feats, {n: gram(styles[n]) for n in s.style_layers}, torch.float32, True,
                              fused)
        x = (y + 0.05).clamp(0, 1).requires_grad_(True)
        objective(x)[0].sum().backward()
        results.append(x.grad)
    assert results[1].shape == (1, 1, 40, 48)
    assert_rel_close(results[1], results[0], 1e-5)


def test_engine_runs_agree():
    """A few L-BFGS iterations give the same picture with either backward pass."""
    cat = Image.open(DATA / "chelsea.png").convert("RGB")
    starry = Image.open(DATA / "starry_night.jpg").convert("RGB")
    s = Settings(size=48, iterations=5, scales=1, tolerance=0, precision="float32")
    ref = Engine("cpu", fused=False).run(cat, [starry], s)
    ours = Engine("cpu", fused=True).run(cat, [starry], s)
    for a, b in zip(ours.records, ref.records):
        assert a.total == pytest.approx(b.total, rel=1e-3)
    diff = torch.tensor(list(ours.image.tobytes())) - torch.tensor(list(ref.image.tobytes()))
    assert diff.abs().max() <= 2  # grey levels of 255
