"""Each loss against a hand computation on small tensors."""

import pytest
import torch

from stylize.engine.losses import ContentLoss, StyleLoss, TVLoss, Valid, gram, tv_and_grad


def test_gram_of_known_matrix():
    # c=2 channels over h*w=2 positions: F = [[1, 2], [3, 4]].
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    want = torch.tensor([[1 + 4, 3 + 8], [3 + 8, 9 + 16]]) / (2 * 1 * 2)
    torch.testing.assert_close(gram(f)[0], want)


def test_gram_same_for_channels_last():
    f = torch.rand(2, 8, 5, 7)
    torch.testing.assert_close(gram(f), gram(f.contiguous(memory_format=torch.channels_last)))


def test_gram_is_size_normalized():
    """A texture tiled 4x has the same Gram: the style loss does not grow with image size."""
    f = torch.rand(1, 4, 6, 6)
    torch.testing.assert_close(gram(f), gram(f.repeat(1, 1, 2, 2)))


def test_content_loss_is_mean_squared_error_per_image():
    target = torch.zeros(1, 2, 2, 2)
    x = torch.stack([torch.ones(2, 2, 2), 2 * torch.ones(2, 2, 2)])
    assert ContentLoss(target)(x).tolist() == [1.0, 4.0]


def test_style_loss_hand_computed():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    target = torch.zeros(1, 2, 2)
    g = gram(f)[0]
    assert torch.isclose(StyleLoss(target)(f)[0], (g**2).mean())
    assert StyleLoss(gram(f))(f).item() == 0.0


def test_tv_of_constant_image_is_zero():
    assert TVLoss()(torch.full((1, 3, 5, 5), 0.3)).item() == 0.0


def test_tv_hand_computed():
    # One row [0, 1, 0]: horizontal squared diffs 1, 1 -> mean 1; no vertical pairs... use 2 rows.
    x = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]).view(1, 1, 2, 3)
    # dx: 4 diffs all of size 1 -> mean 1; dy: 3 diffs all 0 -> mean 0.
    assert TVLoss()(x).item() == 0.5


def test_tv_and_grad_match_autograd():
    """The tiled levels' TV: value and gradient (added into a buffer) equal autograd through TVLoss."""
    x = torch.rand(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    ((2.5 * TVLoss()(x)) * w).sum().backward()
    grad = torch.full_like(x, 0.25).detach()  # what is there already is kept
    tv = tv_and_grad(x.detach(), 2.5, grad)
    torch.testing.assert_close(tv, 2.5 * TVLoss()(x).detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close((grad - 0.25) * w.view(2, 1, 1, 1), x.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(tv_and_grad(x.detach(), 2.5, None), tv)


def test_gram_gradient_matches_autograd():
    f = torch.rand(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 5, 5, dtype=torch.float64)
    (gram(f) * w).sum().backward()
    ours = f.grad.clone()
    f.grad = None
    x = f.permute(0, 2, 3, 1).reshape(2, 12, 5)
    ref = torch.bmm(x.transpose(1, 2), x) / (5 * 12)
    (ref * w).sum().backward()
    torch.testing.assert_close(ours, f.grad)


def _pad(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pad (b, c, h', w') at the bottom and right to (h, w) with noise: masked losses must not see it."""
    out = torch.rand(t.shape[0], t.shape[1], h, w)
    out[..., :t.shape[-2], :t.shape[-1]] = t
    return out


def test_valid_mask_and_halving():
    v = Valid(((3, 5), (2, 2)))
    m = v.mask(torch.zeros(2, 4, 4, 6))
    assert m.shape == (2, 1, 4, 6)
    assert m[0].sum() == 15 and m[1].sum() == 4 and m[0, 0, 2, 4] == 1 and m[0, 0, 3, 0] == 0
    assert v.halved().sizes == ((1, 2), (1, 1))  # floors, as 2x2 pooling does
    assert v.at_stride(2) == v.halved() and v.at_stride(4).sizes == ((0, 1), (0, 0))
    assert v.counts().tolist() == [15.0, 4.0]


def test_masked_losses_equal_each_image_alone():
    """Gram, content and TV of a padded batch count each image's own positions only."""
    a, b = torch.rand(1, 4, 5, 7), torch.rand(1, 4, 3, 6)
    batch = torch.cat([_pad(a, 5, 7), _pad(b, 5, 7)])
    valid = Valid(((5, 7), (3, 6)))
    grams = gram(batch, valid)
    torch.testing.assert_close(grams[0], gram(a)[0])
    torch.testing.assert_close(grams[1], gram(b)[0])
    target = torch.cat([_pad(torch.rand(1, 4, 5, 7), 5, 7), _pad(torch.rand(1, 4, 3, 6), 5, 7)])
    content = ContentLoss(target)(batch, valid)
    assert content[0] == pytest.approx(ContentLoss(target[:1])(a).item(), rel=1e-6)
    assert content[1] == pytest.approx(ContentLoss(target[1:, :, :3, :6])(b).item(), rel=1e-6)
    style = StyleLoss(gram(a))(batch, valid)
    assert style[0] == pytest.approx(0.0, abs=1e-12)
    assert style[1] == pytest.approx(StyleLoss(gram(a))(b).item(), rel=1e-6)
    tv = TVLoss()(batch, valid)
    assert tv[0] == pytest.approx(TVLoss()(a).item(), rel=1e-6)
    assert tv[1] == pytest.approx(TVLoss()(b).item(), rel=1e-6)


def test_masked_tv_gradient_stays_inside():
    x = _pad(torch.rand(1, 3, 4, 5), 6, 8).requires_grad_(True)
    TVLoss()(x, Valid(((4, 5),))).sum().backward()
    assert x.grad[..., 4:, :].abs().sum() == 0 and x.grad[..., :, 5:].abs().sum() == 0
    assert x.grad[..., :4, :5].abs().sum() > 0
