"""The fused VGG pass (hand-written backward) against autograd through the loss modules."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from stylize.engine.fused import LossSpec, feature_losses
from stylize.engine.losses import ContentLoss, StyleLoss, Valid, gram
from stylize.engine.objective import Objective, run_features
from stylize.engine.optimize import Engine
from stylize.engine.settings import Settings
from stylize.engine.tiled import layer_geometry

DATA = Path(__file__).parent / "data"

# Losses on ReLU outputs (the usual case), on a conv output (its ReLU must not
# run in place) and on a pooling output, in one network.
LAYERS = dict(content_layers=["relu4_2", "conv3_1"], style_layers=["relu1_1", "conv2_1", "relu3_1", "pool4", "relu5_1"])


def evaluate(engine: Engine, settings: Settings, fused: bool, seed: int = 0, size: tuple[int, int] = (48, 64)):
    """Per-image losses and the image gradient of a batch of 2, with different upstream weights."""
    gen = torch.Generator().manual_seed(seed)
    content = torch.rand(2, 3, *size, generator=gen)
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


def test_losses_on_relus_below_a_max_pool():
    """A loss on a ReLU that a max pool follows: its gradient needs that ReLU's whole mask, not only the
    part the pool keeps (the pool's indices and sign)."""
    engine = Engine("cpu")
    s = Settings(size=64, precision="float32", content_layers=["relu2_2"],
                 style_layers=["relu1_2", "relu3_4", "relu4_1"])
    (ref_losses, ref_grad), (losses, grad) = (evaluate(engine, s, f) for f in (False, True))
    for ours, ref in zip(losses, ref_losses):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    assert_rel_close(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_fused_equals_autograd_at_odd_sizes(pooling):
    """Odd sides: every pooling drops a row or column, whose gradient comes only from the layers above
    (the max pool's backward keeps indices and a sign mask, not its input; ``fused._unpool``)."""
    engine = Engine("cpu")
    s = Settings(size=64, precision="float32", pooling=pooling, **LAYERS)
    (ref_losses, ref_grad), (losses, grad) = (evaluate(engine, s, f, size=(47, 61)) for f in (False, True))
    for ours, ref in zip(losses, ref_losses):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    assert_rel_close(grad, ref_grad, 1e-5)


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


def padded_evaluate(engine: Engine, s: Settings, fused: bool, shapes, pad_to, seed: int = 0):
    """Per-image (content, style) losses and image gradients of images of ``shapes`` (h, w), evaluated
    alone (``pad_to=None``) or padded together to ``pad_to`` with masks. Returns lists per image."""
    gen = torch.Generator().manual_seed(seed)
    model, dtype = engine.features(s), engine.dtype(s)
    contents = [torch.rand(1, 3, h, w, generator=gen) for h, w in shapes]
    xs = [(c + 0.1 * torch.randn(c.shape, generator=gen)).clamp(0, 1) for c in contents]
    style = torch.rand(1, 3, 40, 56, generator=gen)
    grams = {n: gram(f) for n, f in run_features(model, style, s.style_layers, dtype, True).items()}
    wc, ws = s.content_weight / len(s.content_layers), s.style_weight / len(s.style_layers)

    def losses(c, x, valid):
        c_feats = model(c.contiguous(memory_format=torch.channels_last), s.content_layers, valid)
        x = x.requires_grad_(True)
        if fused:
            spec = LossSpec({n: (c_feats[n].float(), wc) for n in s.content_layers},
                            {n: (grams[n], ws) for n in s.style_layers})
            content, style_loss = feature_losses(model.preprocess(x), model, spec, True, valid)
        else:
            feats = model(x.contiguous(memory_format=torch.channels_last), s.content_layers + s.style_layers, valid)
            at = {n: None if valid is None else valid.at_stride(layer_geometry(n)[1]) for n in feats}
            content = wc * sum(ContentLoss(c_feats[n])(feats[n], at[n]) for n in s.content_layers)
            style_loss = ws * sum(StyleLoss(grams[n])(feats[n], at[n]) for n in s.style_layers)
        (content + 2 * style_loss).sum().backward()
        return content.detach(), style_loss.detach(), x.grad

    if pad_to is None:
        out = [losses(c, x, None) for c, x in zip(contents, xs)]
        return [o[0][0] for o in out], [o[1][0] for o in out], [o[2][0] for o in out]

    def pad(ts):
        out = torch.rand(len(ts), 3, *pad_to, generator=gen)  # noise in the padding: it must not matter
        for i, t in enumerate(ts):
            out[i, :, :t.shape[-2], :t.shape[-1]] = t[0]
        return out

    content, style_loss, grad = losses(pad(contents), pad(xs), Valid(tuple(shapes)))
    for i, (h, w) in enumerate(shapes):
        assert grad[i, :, h:].abs().sum() == 0 and grad[i, :, :, w:].abs().sum() == 0, "gradient in the padding"
    return list(content), list(style_loss), [grad[i, :, :h, :w] for i, (h, w) in enumerate(shapes)]


# Odd sizes: pooling drops a last row or column that the padded batch has; a landscape and a portrait.
SHAPES = [(48, 64), (53, 37), (35, 61)]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_padded_batch_equals_each_image_alone(fused, pooling):
    """Photos of different shapes padded into one batch: each image's losses and gradient are its own."""
    engine = Engine("cpu")
    s = Settings(size=64, precision="float32", pooling=pooling, **LAYERS)
    alone = padded_evaluate(engine, s, fused, SHAPES, None)
    padded = padded_evaluate(engine, s, fused, SHAPES, (56, 64))
    for ours, ref in zip(padded, alone):
        for a, b in zip(ours, ref):
            assert a.shape == b.shape
            assert_rel_close(a, b, 1e-4)


def test_padded_fused_equals_padded_autograd_bfloat16():
    engine = Engine("cpu")
    s = Settings(size=64, precision="bfloat16", **LAYERS)
    ref = padded_evaluate(engine, s, False, SHAPES, (56, 64))
    ours = padded_evaluate(engine, s, True, SHAPES, (56, 64))
    for o, r in zip(ours[:2], ref[:2]):
        for a, b in zip(o, r):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)  # the same bf16 forward pass
    for a, b in zip(ours[2], ref[2]):
        assert_rel_close(a, b, 2e-2)
