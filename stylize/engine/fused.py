"""The VGG pass and its feature losses as autograd Functions with a hand-written backward.

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
* Only what the backward pass needs is kept: the loss layers' outputs (the
  Gram gradients need them), a one-byte mask for every other ReLU, and for a
  max pool its indices and the sign of its output (the ReLU below it needs
  nothing more: its gradient is zero off the argmax). A frozen convolution's
  input gradient is the transposed convolution of its output's gradient, so
  no convolution input is kept. Against keeping every ReLU output and
  convolution input, a float32 pass holds 40% less (1.0 kB per pixel at
  1024 px instead of 1.6; ``benchmarks/pass_memory.py``), in the same time.
* No autograd graph is recorded for the VGG pass.

A padded batch (``losses.Valid``, photos of different shapes padded to one
size) zeroes the preprocessed image and every ReLU and pooling output outside
each image's valid region, as ``VGG19Features`` does, and its backward
applies the same masks to the gradient (a ReLU's mask already does: its saved
output is zero there). The losses count valid positions only.

A tile of a print (``tiled.py``) runs the same stack through ``tile_terms``:
its content loss over the positions its core owns, and its part of each style
layer's Gram matrix, whose gradient (the whole image's style loss with respect
to the Gram summed over every tile) comes back into the same walk.

The losses and their normalization are exactly those of ``stylize.engine.losses``;
``tests/test_fused.py`` checks values and gradients against the autograd
reference, ``tests/test_tiled.py`` the tiles against the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

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


@dataclass(frozen=True)
class TileSpec:
    """A tile's part of the whole image's losses (``tiled.py``): terms over the positions its core owns.

    ``core``: {layer: (rows, cols) of the core in the tile's map of that layer}. ``content``: {layer:
    (target at the core positions, weight divided by the whole layer's size c*h*w)}. ``style``: the
    layers whose Gram sums over the core positions ``tile_terms`` returns, unnormalized: the caller adds
    them up over the tiles.
    """

    core: dict[str, tuple[slice, slice]]
    content: dict[str, tuple[Tensor, float]]
    style: tuple[str, ...]


def _rows(t: Tensor) -> Tensor:
    """(b, c, h, w) -> (b, h*w, c): a view for channels-last tensors, a copy otherwise."""
    b, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(b, h * w, c)


def _unrows(rows: Tensor, shape: torch.Size) -> Tensor:
    """(b, h*w, c) -> a channels-last (b, c, h, w) view of it."""
    b, c, h, w = shape
    return rows.view(b, h, w, c).permute(0, 3, 1, 2)


class _Stack:
    """One pass through the VGG stack up to the deepest layer the losses use, and what its backward needs.

    ``forward`` runs the layers and yields each layer's output; with ``keep`` it
    saves, per layer, only what that layer's input gradient needs (``_saved``),
    else nothing. ``backward`` walks the layers in reverse with one gradient
    buffer, updated in place; ``inject(i, g)`` adds the losses' gradients on
    layer ``i``'s output into it (``g`` is None until the first).
    """

    def __init__(self, model: VGG19Features, wanted: set[str], valid: Valid | None, keep: bool):
        self.layers, self.names = model.layers, model.names
        self.wanted, self.valid, self.keep = wanted, valid, keep
        self.deepest = max(LAYER_INDEX[n] for n in wanted)
        self.saved: list[tuple | None] = []
        self.shapes: list[tuple[torch.Size, torch.dtype]] = []  # each layer's output
        self.masks: dict[int, Tensor] = {}  # applied to the gradient of a layer's output (-1: the input)

    def forward(self, x: Tensor) -> Iterator[tuple[int, Tensor, Tensor | None, Tensor | None]]:
        """Yields (layer index, output, loss mask, valid positions per image (b,)) for a padded batch: the
        mask (conv outputs, which the stack does not zero) is for the losses, None when the output is
        already masked; both None for a batch of one shape."""
        valid = self.valid
        if valid is not None:
            x = x * valid.mask(x)
            self.masks[-1] = valid.mask(x)
        for i in range(self.deepest + 1):
            layer = self.layers[i]
            saved: tuple | None = None
            if isinstance(layer, nn.Conv2d):
                saved = ("conv", None)
                x = layer(x)
            elif isinstance(layer, nn.ReLU):
                # In place unless the conv output is itself a loss layer.
                x = torch.relu(x) if self.names[i - 1] in self.wanted else torch.relu_(x)
            elif isinstance(layer, nn.MaxPool2d):
                x, indices = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2])
                if self.keep:  # the ReLU below keeps nothing: its mask at each argmax is the maximum's sign
                    saved = ("max", (indices, x > 0, self.shapes[-1][0][-2:]))
                del indices
            else:
                saved, x = ("avg", x.shape), layer(x)
            if valid is not None and not isinstance(layer, nn.Conv2d):
                valid = valid if isinstance(layer, nn.ReLU) else valid.halved()
                x.mul_(valid.mask(x))  # a ReLU's output too, before its mask is taken: its backward then masks
                if not isinstance(layer, nn.ReLU):
                    self.masks[i] = valid.mask(x)
            if self.keep:
                if isinstance(layer, nn.ReLU):
                    saved = ("relu", self._relu_saved(i, x))
                self.saved.append(saved)
            self.shapes.append((x.shape, x.dtype))
            del saved
            if valid is None:
                yield i, x, None, None
            else:  # conv outputs are not masked in the stack (the ReLU above does it): mask them for the losses
                yield i, x, valid.mask(x) if isinstance(layer, nn.Conv2d) else None, valid.counts(x.device)

    def _relu_saved(self, i: int, out: Tensor) -> Tensor | None:
        """What ReLU ``i``'s backward keeps: its output where the losses keep that anyway (their gradient
        on it needs the whole mask), else nothing before a max pool (the pool keeps the part of the mask
        that matters), else a one-byte mask."""
        if self.names[i] in self.wanted:
            return out
        after = self.layers[i + 1] if i + 1 <= self.deepest else None
        return None if isinstance(after, nn.MaxPool2d) else out > 0

    def backward(self, inject: Callable[[int, Tensor | None], Tensor | None]) -> Tensor:
        """The gradient of the stack's input, from the losses' gradients that ``inject`` adds per layer."""
        g: Tensor | None = None
        for i in range(self.deepest, -1, -1):
            kind, what = self.saved[i]
            self.saved[i] = None  # what the layer kept is dropped as the walk goes down
            g = inject(i, g)
            if g is None:
                continue
            if i in self.masks:  # a pooling output zeroed outside the valid region: so is its gradient
                g = g * self.masks[i]
            layer = self.layers[i]
            if kind == "relu":
                if what is None:  # the max pool above applied this ReLU's mask
                    continue
                if what.dtype == torch.bool:
                    g = g.mul_(what)
                else:
                    g = torch.ops.aten.threshold_backward.grad_input(g, what, 0.0, grad_input=g)
            elif kind == "conv":
                # The weights are frozen: the input gradient only, a transposed convolution, which needs no
                # input. VGG's convolutions (3x3, stride 1, padding 1) keep the size, so it comes back whole.
                g = F.conv_transpose2d(g, layer.weight, None, 1, layer.padding)
            elif kind == "max":
                g = _unpool(g, what)
            else:
                g = _avg_unpool(g, what)
        if -1 in self.masks:
            g = g * self.masks[-1]
        return g.float()


def _unpool(g: Tensor, saved: tuple[Tensor, Tensor, torch.Size]) -> Tensor:
    """A 2x2 max pool's input gradient, the ReLU below it included: each output's gradient goes to its
    window's argmax (``indices``) where the maximum is positive (``positive``: that ReLU's mask, read at
    the argmax)."""
    indices, positive, size = saved
    return F.max_unpool2d(g * positive, indices, 2, 2, output_size=size)


def _avg_unpool(g: Tensor, shape: torch.Size) -> Tensor:
    """A 2x2 average pool's input gradient: each output's gradient spread over its window, a quarter each."""
    ho, wo = g.shape[-2:]
    grad = torch.empty(shape, dtype=g.dtype, device=g.device, memory_format=_format(g)).zero_()
    windows = grad[..., : 2 * ho, : 2 * wo].unflatten(3, (wo, 2)).unflatten(2, (ho, 2))
    windows.copy_((g * 0.25)[:, :, :, None, :, None].expand_as(windows))
    return grad


def _format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() \
        else torch.contiguous_format


class _FeatureLoss(torch.autograd.Function):
    """(preprocessed image) -> (weighted content loss (b,), weighted style loss (b,))."""

    @staticmethod
    def forward(ctx, x: Tensor, model: VGG19Features, spec: LossSpec, channels_last: bool, valid: Valid | None):
        stack = _Stack(model, set(spec.content) | set(spec.style), valid, keep=ctx.needs_input_grad[0])
        x = _prepared(x, model, channels_last)
        content = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        style = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        # The loss gradients' ingredients, per layer index.
        content_diff: dict[int, tuple[Tensor, float]] = {}
        style_diff: dict[int, tuple[Tensor, Tensor, float]] = {}
        for i, out, mask, counts in stack.forward(x):
            name = model.names[i]
            if name in spec.content:
                content += _content_loss(out, spec.content[name], mask, counts, content_diff, i)
            if name in spec.style:
                style += _style_loss(out, spec.style[name], mask, counts, style_diff, i)
        if stack.keep:
            ctx.state = (stack, content_diff, style_diff)
        return content, style

    @staticmethod
    def backward(ctx, grad_content: Tensor, grad_style: Tensor):
        stack, content_diff, style_diff = ctx.state
        ctx.state = None

        def inject(i: int, g: Tensor | None) -> Tensor | None:
            out_shape, out_dtype = stack.shapes[i]
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
            return g

        return stack.backward(inject), None, None, None, None


class _TileTerms(torch.autograd.Function):
    """(preprocessed tile) -> (weighted content loss of its core (b,), then per style layer the Gram sum of
    its core positions (b, c, c)); see ``TileSpec``."""

    @staticmethod
    def forward(ctx, x: Tensor, model: VGG19Features, spec: TileSpec, channels_last: bool):
        wanted = set(spec.content) | set(spec.style)
        stack = _Stack(model, wanted, None, keep=ctx.needs_input_grad[0])
        x = _prepared(x, model, channels_last)
        content = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        grams: dict[str, Tensor] = {}
        kept: dict[int, tuple[str, Tensor, Tensor | None]] = {}  # layer index -> (name, output, content diff)
        for i, out, _, _ in stack.forward(x):
            name = model.names[i]
            if name not in wanted:
                continue
            rows, cols = spec.core[name]
            core = out[..., rows, cols]
            diff = None
            if name in spec.content:
                target, k = spec.content[name]
                diff = core.float() - target
                content += k * diff.pow(2).flatten(1).sum(1)
            if name in spec.style:
                r = core.float().permute(0, 2, 3, 1).reshape(core.shape[0], -1, core.shape[1])  # (b, m, c)
                grams[name] = torch.bmm(r.transpose(1, 2), r)
                del r
            if stack.keep:
                kept[i] = (name, out, diff)
        if stack.keep:
            ctx.state = (stack, spec, kept)
        return (content, *(grams[n] for n in spec.style))

    @staticmethod
    def backward(ctx, grad_content: Tensor, *grad_grams: Tensor):
        stack, spec, kept = ctx.state
        ctx.state = None
        upstream = dict(zip(spec.style, grad_grams))

        def inject(i: int, g: Tensor | None) -> Tensor | None:
            if i not in kept:
                return g
            name, out, diff = kept.pop(i)
            if g is None:
                g = torch.zeros_like(out)  # the gradient is zero off the core until the layers below spread it
            rows, cols = spec.core[name]
            core = g[..., rows, cols]  # a view: added into in place
            if name in upstream:
                # d/dX of the Gram sum X^T X with upstream gradient U: X (U + U^T)
                u = upstream[name]
                r = _rows(out[..., rows, cols])  # (b, m, c), a copy of the core's rows
                core.add_(_unrows(torch.bmm(r, (u + u.transpose(1, 2)).to(r.dtype)), core.shape))
            if diff is not None:
                # d/dF of k * sum((F - P)^2)
                core.add_(diff.mul_((2 * spec.content[name][1] * grad_content).view(-1, 1, 1, 1)).to(g.dtype))
            return g

        return stack.backward(inject), None, None, None


def tile_terms(x: Tensor, model: VGG19Features, spec: TileSpec,
               channels_last: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """(weighted content loss of the core (b,), {style layer: Gram sum of the core (b, c, c)}) of the
    preprocessed tile ``x``, both differentiable in ``x`` through the hand-written backward.

    The style loss of the whole image is a function of the Grams summed over every tile: backpropagating
    its gradient with respect to that sum through each tile's part gives each tile's share of the image
    gradient, one tile at a time.
    """
    content, *grams = _TileTerms.apply(x, model, spec, channels_last)
    return content, dict(zip(spec.style, grams))


def _prepared(x: Tensor, model: VGG19Features, channels_last: bool) -> Tensor:
    """The preprocessed image in the network's dtype and memory format."""
    x = x.to(model.layers[0].weight.dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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
