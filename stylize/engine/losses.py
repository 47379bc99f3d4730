"""Content, Gram style and total-variation losses, each a tiny module with a buffered target.

All losses return one value per image in the batch, shape (b,), so a batch of
independent images can be optimized together: the gradient of the sum with
respect to image i is the gradient of loss i alone.

Normalization, and where it departs from Gatys et al. 2015
-----------------------------------------------------------
Let F be a layer's features, shape (C, H, W), with M = H*W positions.

* Content: ``mean((F - P)**2)`` over all C*H*W elements. The paper uses
  ``1/2 * sum``, which grows with the pixel count; the mean keeps the same
  weight meaningful at 256 and at 1024 px.
* Gram: ``G = F F^T / (C*M)`` (C x C). The paper's loss divides the squared
  difference of unnormalized Grams by ``4 N^2 M^2``; dividing G by M already
  removes the dependence on image size. The extra 1/C (as in Johnson et al.'s
  and jcjohnson/neural-style's normalization) evens out the layers, whose
  activations differ by orders of magnitude, so equal layer weights mean
  roughly equal influence.
* Style: ``mean((G - A)**2)`` over the C*C entries, summed over layers with
  weights that sum to 1. Several style images are blended by a weighted mean
  of their Grams, A = sum_s w_s A_s (sum w_s = 1). That has exactly the same
  gradient as the weighted sum of per-style losses sum_s w_s |G - A_s|^2
  (they differ by a constant) at a fraction of the cost.
* Total variation (not in the paper; Mahendran & Vedaldi 2015, used by most
  implementations since): mean squared difference of horizontally and
  vertically adjacent pixels, in 0-1 RGB, averaged over both directions.

Gram matrices and losses are computed in float32 even when the VGG pass runs
in bfloat16: squared sums over millions of positions lose too much in 8
mantissa bits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _Gram(torch.autograd.Function):
    """X^T X / n with a one-product backward.

    Autograd sees X^T X as a product of two views of one tensor and spends two
    matrix products and a strided add on its gradient; the gradient of
    X^T X is X (G + G^T), one batched product.
    """

    @staticmethod
    def forward(ctx, x: Tensor, n: int) -> Tensor:  # x: (b, hw, c)
        ctx.save_for_backward(x)
        ctx.n = n
        return torch.bmm(x.transpose(1, 2), x).div_(n)  # (b, c, c)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return torch.bmm(x, grad + grad.transpose(1, 2)).div_(ctx.n), None  # (b, hw, c)


def gram(features: Tensor) -> Tensor:
    """(b, c, h, w) features -> (b, c, c) float32 Gram matrices divided by c*h*w."""
    b, c, h, w = features.shape
    # A channels-last tensor is (b, h, w, c) in memory: view it as (b, h*w, c)
    # without a copy and take X^T X.
    x = features.float().permute(0, 2, 3, 1).reshape(b, h * w, c)  # (b, hw, c)
    return _Gram.apply(x, c * h * w)


class ContentLoss(nn.Module):
    """Mean squared difference to the target features, per image."""

    def __init__(self, target: Tensor):
        super().__init__()
        self.register_buffer("target", target.detach().float())

    def forward(self, features: Tensor) -> Tensor:
        return (features.float() - self.target).pow(2).flatten(1).mean(1)  # (b,)


class StyleLoss(nn.Module):
    """Mean squared difference between Gram matrices, per image."""

    def __init__(self, target_gram: Tensor):
        super().__init__()
        self.register_buffer("target", target_gram.detach().float())  # (1 or b, c, c)

    def forward(self, features: Tensor) -> Tensor:
        return (gram(features) - self.target).pow(2).flatten(1).mean(1)  # (b,)


class TVLoss(nn.Module):
    """Total variation: mean squared difference of neighbouring pixels, per image."""

    def forward(self, image: Tensor) -> Tensor:
        dx = (image[..., :, 1:] - image[..., :, :-1]).pow(2).flatten(1).mean(1)
        dy = (image[..., 1:, :] - image[..., :-1, :]).pow(2).flatten(1).mean(1)
        return (dx + dy) / 2  # (b,)
