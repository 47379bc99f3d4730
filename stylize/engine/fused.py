"""The VGG pass and its feature losses as one autograd Function with a hand-written backward.

``losses.ContentLoss``/``StyleLoss`` on ``VGG19Features`` outputs, differentiated
by autograd, is the reference implementation (and what ``torch.compile`` and
``Engine.judge`` use). This module computes the same losses and the same
gradient with less memory traffic, which matters on a CPU where everything
but the convolutions is bound by memory bandwidth:

* The backward pass walks the layers in reverse and keeps one gradient
  buffer per layer, updated in place: the ReLU mask is applied in place, a
  style layer's gradient ``X (G - A) * k`` is added by one fused
  ``baddbmm`` into the buffer, a content layer's by one ``add_``. Autograd
  instead allocates a new tensor for every ReLU backward, for each loss's
  gradient and for their sum (at 512 px each is a 45 MB tensor in block 1).
* Only what the backward pass needs is kept: ReLU outputs (for the masks and
  the Gram gradients) and max-pool indices. The frozen convolutions need no
  inputs for their input gradient beyond the shape, and pooled outputs are
  not kept.
* No autograd graph is recorded for the VGG pass.

A padded batch (``losses.Valid``, photos of different shapes padded to one
size) zeroes the preprocessed image and every ReLU and pooling output outside
each image's valid region, as ``VGG19Features`` does, and its backward
applies the same masks to the gradient (a ReLU's mask already does: its saved
output is zero there). The losses count valid positions only.

The losses and their normalization are exactly those of ``stylize.engine.losses``;
``tests/test_fused.py`` checks values and gradients against the autograd
reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stylize.engine.features import LAYER_INDEX, VGG19Features
from stylize.engine.losses import Valid


@dataclass(frozen=True)
class LossSpec:
    """What the losses need: targets and weights, already folded together.

    ``content``: {layer: (target features, weight)}, the weight including the
    content weight and the 1/len(content layers) average. ``style``: {layer:
    (target Gram (1 or b, c, c), weight)}, the weight including the style
    weight and the layer's share.
    """

    content: dict[str, tuple[Tensor, float]]
    style: dict[str, tuple[Tensor, float]]


def _rows(t: Tensor) -> Tensor:
    """(b, c, h, w) -> (b, h*w, c): a view for channels-last tensors, a copy otherwise."""
    b, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(b, h * w, c)


def _unrows(rows: Tensor, shape: torch.Size) -> Tensor:
    """(b, h*w, c) -> a channels-last (b, c, h, w) view of it."""
    b, c, h, w = shape
    return rows.view(b, h, w, c).permute(0, 3, 1, 2)


class _FeatureLoss(torch.autograd.Function):
    """(preprocessed image) -> (weighted content loss (b,), weighted style loss (b,))."""

    @staticmethod
    def forward(ctx, x: Tensor, model: VGG19Features, spec: LossSpec, channels_last: bool, valid: Valid | None):
        keep = ctx.needs_input_grad[0]
        wanted = set(spec.content) | set(spec.style)
        deepest = max(LAYER_INDEX[n] for n in wanted)
        x = x.to(model.layers[0].weight.dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        b = x.shape[0]
        # Masks the backward applies to the gradient of a layer's output (-1: the input); see _masked.
        masks: dict[int, Tensor] = {}
        if valid is not None:
            x = x * valid.mask(x)
            masks[-1] = valid.mask(x)
        content = torch.zeros(b, dtype=torch.float32, device=x.device)
        style = torch.zeros(b, dtype=torch.float32, device=x.device)
        # Per layer, what its backward needs, (kind, tensor, indices): the conv's
        # input, the ReLU's output, the pool's input and max-pool indices; each
        # layer's output shape and dtype; the loss gradients' ingredients.
        saved: list[tuple] = []
        shapes: list[tuple[torch.Size, torch.dtype]] = []
        content_diff: dict[int, tuple[Tensor, float]] = {}
        style_diff: dict[int, tuple[Tensor, Tensor, float]] = {}
        for i in range(deepest + 1):
            layer, name = model.layers[i], model.names[i]
            if isinstance(layer, nn.Conv2d):
                saved.append(("conv", x, None))
                x = layer(x)
            elif isinstance(layer, nn.ReLU):
                # In place unless the conv output is itself a loss layer.
                x = torch.relu(x) if model.names[i - 1] in wanted else torch.relu_(x)
                saved.append(("relu", x, None))
            elif isinstance(layer, nn.MaxPool2d):
                out, indices = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2])
                saved.append(("max", x, indices))
                x = out
            else:
                saved.append(("avg", x, None))
                x = layer(x)
            if valid is not None and not isinstance(layer, nn.Conv2d):
                valid = valid if isinstance(layer, nn.ReLU) else valid.halved()
                x.mul_(valid.mask(x))  # a ReLU's saved output too: its backward then masks the gradient
                if not isinstance(layer, nn.ReLU):
                    masks[i] = valid.mask(x)
            shapes.append((x.shape, x.dtype))
            # Conv outputs are not masked in the stack (the ReLU above does it): mask them for the losses.
            mask = None if valid is None or not isinstance(layer, nn.Conv2d) else valid.mask(x)
            counts = None if valid is None else valid.counts(x.device)  # (b,) valid positions
            if name in spec.content:
                content += _content_loss(x, spec.content[name], mask, counts, content_diff, i)
            if name in spec.style:
                style += _style_loss(x, spec.style[name], mask, counts, style_diff, i)
        if keep:
            ctx.layers = model.layers
            ctx.state = (saved, shapes, content_diff, style_diff, deepest, masks)
        return content, style

    @staticmethod
    def backward(ctx, grad_content: Tensor, grad_style: Tensor):
        saved, shapes, content_diff, style_diff, deepest, masks = ctx.state
        ctx.state = None  # activations are dropped as the walk goes down
        g: Tensor | None = None
        for i in range(deepest, -1, -1):
            kind, tensor, indices = saved[i]
            saved[i] = None
            out_shape, out_dtype = shapes[i]
            # The gradients of the losses on this layer's output join the flow from above, in place.
            if i in style_diff:
                rows, gdiff, k = style_diff.pop(i)
                # In the features' dtype, like the rest of the backward pass.
                m = gdiff.mul_((k * grad_style).view(-1, 1, 1)).to(rows.dtype)  # (b, c, c)
                if g is None:
                    g = _unrows(torch.bmm(rows, m), out_shape)
                elif g.dtype == rows.dtype and g.is_contiguous(memory_format=torch.channels_last):
                    _rows(g).baddbmm_(rows, m)  # g += X M in one pass over g, no temporary
                else:
                    g.add_(_unrows(torch.bmm(rows, m), out_shape).to(g.dtype))
            if i in content_diff:
                diff, k = content_diff.pop(i)
                part = diff.mul_((k * grad_content).view(-1, 1, 1, 1))
                g = part.to(out_dtype) if g is None else g.add_(part.to(g.dtype))
            if g is None:
                continue
            if i in masks:  # a pooling output zeroed outside the valid region: so is its gradient
                g = g * masks[i]
            layer = ctx.layers[i]
            if kind == "relu":
                g = torch.ops.aten.threshold_backward.grad_input(g, tensor, 0.0, grad_input=g)
            elif kind == "conv":
                # The weights are frozen: the input gradient only.
                g = torch.ops.aten.convolution_backward(
                    g, tensor, layer.weight, None, list(layer.stride), list(layer.padding), list(layer.dilation),
                    False, [0, 0], layer.groups, [True, False, False],
                )[0]
            elif kind == "max":
                g = torch.ops.aten.max_pool2d_with_indices_backward(g, tensor, [2, 2], [2, 2], [0, 0], [1, 1],
                                                                    False, indices)
            else:
                g = torch.ops.aten.avg_pool2d_backward(g, tensor, [2, 2], [2, 2], [0, 0], False, True, None)
        if -1 in masks:
            g = g * masks[-1]
        return g.float(), None, None, None, None


def _content_loss(x: Tensor, target_weight: tuple[Tensor, float], mask: Tensor | None, counts: Tensor | None,
                  content_diff: dict, i: int) -> Tensor:
    """Weighted ``mean((F - P)^2)`` per image (over valid positions when ``counts``); keeps its gradient's
    ingredients in ``content_diff[i]``."""
    target, weight = target_weight
    diff = x.float() - target  # (b, c, h, w)
    if mask is not None:
        diff.mul_(mask)
    n = diff[0].numel() if counts is None else diff.shape[1] * counts  # c h w, or (b,) c h_i w_i
    # d/dF of weight * mean((F - P)^2) = (F - P) * 2 * weight / (c h w)
    content_diff[i] = (diff, 2 * weight / n)
    if counts is None:
        return weight * diff.pow(2).flatten(1).mean(1)
    return weight * diff.pow(2).flatten(1).sum(1) / n


def _style_loss(x: Tensor, target_weight: tuple[Tensor, float], mask: Tensor | None, counts: Tensor | None,
                style_diff: dict, i: int) -> Tensor:
    """Weighted ``mean((G - A)^2)`` per image, G over valid positions when ``counts``; keeps its gradient's
    ingredients in ``style_diff[i]``."""
    target, weight = target_weight
    b, c, h, w = x.shape
    n = c * h * w if counts is None else c * counts  # or (b,) c h_i w_i
    rows = _rows(x if mask is None else x * mask)  # the product keeps x's memory format
    r32 = rows.float()  # (b, hw, c) Grams in float32 (a copy only for bf16)
    gram = torch.bmm(r32.transpose(1, 2), r32)  # (b, c, c)
    gdiff = (gram.div_(n) if counts is None else gram.div_(n.view(b, 1, 1))).sub_(target)  # G - A, symmetric
    # d/dX of weight * mean((X^T X / n - A)^2) = X (G - A) * 4 * weight / (c^2 n)
    style_diff[i] = (rows, gdiff, 4 * weight / (c * c * n))
    return weight * gdiff.pow(2).flatten(1).mean(1)


def feature_losses(x: Tensor, model: VGG19Features, spec: LossSpec, channels_last: bool,
                   valid: Valid | None = None) -> tuple[Tensor, Tensor]:
    """Weighted content and style losses per image of the preprocessed batch ``x``, differentiable in ``x``.

    ``valid``: the valid regions of a padded batch; each image's losses are then those it has alone.
    """
    return _FeatureLoss.apply(x, model, spec, channels_last, valid)
