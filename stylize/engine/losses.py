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

Padded batches
--------------
Photos of different shapes share a batch by padding each at the bottom and
right to the batch's largest height and width. ``Valid`` says where each
image's own pixels are. Every loss takes it and counts only those positions,
normalized by the image's own count (M = h_i w_i, not H W), so each image's
loss is the one it has alone. The network keeps the padding out of the
features too: the inputs of every convolution are zero outside ``Valid``
(``features.py`` and ``fused.py``), which is exactly the zero padding the
convolution applies at an unpadded image's border, so the features at an
image's own positions are its solo features, not merely close to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Valid:
    """Where each image of a padded batch has its pixels: rows [0, h) and columns [0, w).

    ``sizes`` holds (h, w) per image at the resolution of the tensor it is
    applied to; ``halved()`` gives the valid region after a 2x2 pooling.
    """

    sizes: tuple[tuple[int, int], ...]
    _masks: dict = field(default_factory=dict, compare=False, repr=False)  # (h, w, dtype, device) -> mask

    def halved(self) -> "Valid":
        """The valid region after a 2x2, stride-2 pooling: it floors, dropping an odd last row or column,
        as it does on the image alone."""
        return Valid(tuple((h // 2, w // 2) for h, w in self.sizes))

    def at_stride(self, stride: int) -> "Valid":
        """The valid region of a layer ``stride`` pixels apart (2 ** poolings; see ``tiled.layer_geometry``):
        a loss on that layer's features takes this one."""
        return Valid(tuple((h // stride, w // stride) for h, w in self.sizes))

    def mask(self, like: Tensor) -> Tensor:
        """(b, 1, H, W) ones on the valid positions and zeros on the padding, in ``like``'s dtype and device."""
        H, W = like.shape[-2:]
        key = (H, W, like.dtype, like.device)
        if key not in self._masks:
            hs = torch.tensor([h for h, _ in self.sizes], device=like.device)
            ws = torch.tensor([w for _, w in self.sizes], device=like.device)
            rows = torch.arange(H, device=like.device)[None, :] < hs[:, None]  # (b, H)
            cols = torch.arange(W, device=like.device)[None, :] < ws[:, None]  # (b, W)
            self._masks[key] = (rows[:, None, :, None] & cols[:, None, None, :]).to(like.dtype)  # (b, 1, H, W)
        return self._masks[key]

    def counts(self, device: torch.device | str = "cpu") -> Tensor:
        """(b,) float32 valid positions per image, h * w."""
        return torch.tensor([float(h * w) for h, w in self.sizes], device=device)


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


def gram(features: Tensor, valid: Valid | None = None) -> Tensor:
    """(b, c, h, w) features -> (b, c, c) float32 Gram matrices divided by c*h*w.

    With ``valid``, over each image's valid positions only, divided by c * h_i * w_i.
    """
    b, c, h, w = features.shape
    if valid is not None:
        features = features * valid.mask(features)
        n = (c * valid.counts(features.device)).view(b, 1, 1)  # (b, 1, 1)
    else:
        n = c * h * w
    # A channels-last tensor is (b, h, w, c) in memory: view it as (b, h*w, c)
    # without a copy and take X^T X.
    x = features.float().permute(0, 2, 3, 1).reshape(b, h * w, c)  # (b, hw, c)
    return _Gram.apply(x, n)


class ContentLoss(nn.Module):
    """Mean squared difference to the target features, per image."""

    def __init__(self, target: Tensor):
        super().__init__()
        self.register_buffer("target", target.detach().float())

    def forward(self, features: Tensor, valid: Valid | None = None) -> Tensor:
        diff = features.float() - self.target
        if valid is None:
            return diff.pow(2).flatten(1).mean(1)  # (b,)
        per_image = (diff * valid.mask(diff)).pow(2).flatten(1).sum(1)
        return per_image / (diff.shape[1] * valid.counts(diff.device))  # (b,)


class StyleLoss(nn.Module):
    """Mean squared difference between Gram matrices, per image."""

    def __init__(self, target_gram: Tensor):
        super().__init__()
        self.register_buffer("target", target_gram.detach().float())  # (1 or b, c, c)

    def forward(self, features: Tensor, valid: Valid | None = None) -> Tensor:
        return (gram(features, valid) - self.target).pow(2).flatten(1).mean(1)  # (b,)


@torch.no_grad()
def tv_and_grad(x: Tensor, weight: float, grad: Tensor | None) -> Tensor:
    """``weight * TVLoss()(x)`` per image (b,), its gradient added into ``grad`` in place when given.

    For a print-size level (``stylize.engine.tiled``): one buffer of neighbour differences at a time,
    where autograd through ``TVLoss`` holds both directions' differences for the backward and makes
    about five more image-sized temporaries in it (1 GB at 4096 x 4096).
    """
    b = x.shape[0]
    total = x.new_zeros(b)
    for dim in (-1, -2):
        n = x.shape[dim]
        d = x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)  # (b, c, ...): d_i = x_{i+1} - x_i
        count = d[0].numel()
        flat = d.reshape(b, 1, -1)  # a view unless x has unusual strides
        total += torch.bmm(flat, flat.transpose(1, 2)).view(b) * (weight / (2 * count))
        if grad is not None:  # d/dx_i of weight * mean(d^2) / 2 = weight * (d_{i-1} - d_i) / count
            d.mul_(weight / count)
            grad.narrow(dim, 1, n - 1).add_(d)
            grad.narrow(dim, 0, n - 1).sub_(d)
        del d, flat
    return total


class TVLoss(nn.Module):
    """Total variation: mean squared difference of neighbouring pixels, per image."""

    def forward(self, image: Tensor, valid: Valid | None = None) -> Tensor:
        dx = (image[..., :, 1:] - image[..., :, :-1]).pow(2)
        dy = (image[..., 1:, :] - image[..., :-1, :]).pow(2)
        if valid is None:
            return (dx.flatten(1).mean(1) + dy.flatten(1).mean(1)) / 2  # (b,)
        # Only pairs of two valid pixels, averaged over the image's own pair count.
        m = valid.mask(image)
        c = image.shape[1]
        hs, ws = (torch.tensor([float(v[k]) for v in valid.sizes], device=image.device) for k in (0, 1))
        dx = (dx * (m[..., :, 1:] * m[..., :, :-1])).flatten(1).sum(1) / (c * hs * (ws - 1)).clamp_min(1)
        dy = (dy * (m[..., 1:, :] * m[..., :-1, :])).flatten(1).sum(1) / (c * (hs - 1) * ws).clamp_min(1)
        return (dx + dy) / 2  # (b,)
