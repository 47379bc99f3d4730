"""Each loss against a hand computation on small tensors."""

import torch

from stylize.engine.losses import ContentLoss, StyleLoss, TVLoss, gram


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
