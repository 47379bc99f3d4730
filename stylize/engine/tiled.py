"""The style objective evaluated tile by tile: the same loss and gradient as the whole image, in bounded memory.

Why it is exact
---------------
A feature at layer l, position p, depends only on the input pixels in its
receptive field (156 px square at relu5_1, centred on p's 16 px cell). Cut the
image into *cores* and run the network on each core grown by a *halo* at
least that reach (clipped to the image): every feature inside the core then
sees exactly the pixels it sees in the whole image. Where the tile touches an
image border the network zero-pads exactly as it does for the whole image;
where it does not, the halo keeps the tile's own zero padding out of the core's
receptive fields. Tile offsets are multiples of the deepest layer's stride
(16 px to relu5_1), so every pooling window falls where it falls in the whole
image.

The losses are sums over positions, each position in exactly one core:

* Content: ``mean((F - P)^2)`` is a sum over positions divided by the whole
  layer's size, so each tile adds its core's part.
* Style: the Gram ``G = sum_p f_p f_p^T / (c h w)`` is a sum over positions,
  so a first pass (no gradient) adds up every core's part of G. The loss
  ``mean((G - A)^2)`` is a function of the global G, and its gradient at a
  position is ``f_p (G - A) * 4 / (c^2 c h w)``: the second pass runs each tile
  forward and backward with that gradient injected at the core positions.
* Total variation is cheap and local: it is evaluated on the whole image,
  its gradient added straight into the image's gradient
  (``losses.tv_and_grad``: no autograd temporaries).

The gradient of the image is the sum over tiles of each tile's input
gradient (which reaches into the halo: a core feature depends on halo pixels),
added at the tile's place. No blending, no seams. ``tests/test_tiled.py``
checks loss and gradient against the untiled evaluation.

Both passes run on ``fused.tile_terms``, the whole image's hand-written
backward (``fused.py``): a tile's content loss and Gram sums over its core,
differentiable; pass 2 backpropagates into each tile the style loss's
gradient with respect to the global Gram sum.

Cost: every tile runs the network forward twice and backward once (the
untiled pass: once each), on a tile enlarged by its halo; the last tile of
the first pass keeps what its backward needs, so the second pass starts
with it and runs its forward pass only once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from stylize.engine.features import LAYER_INDEX, LAYERS, VGG19Features, check_layers
from stylize.engine.fused import LossSpec, TileSpec, tile_terms
from stylize.engine.losses import tv_and_grad
from stylize.errors import ConfigError

__all__ = ["Tile", "TilePlan", "layer_geometry", "halo_for", "plan_tiles", "tiled_features", "tiled_grams",
           "tiled_feature_losses"]


@dataclass(frozen=True)
class Tile:
    """One tile: its core (the positions it owns) and its outer box (core plus halo, clipped), in image pixels.

    Boxes are (top, bottom, left, right), bottom and right exclusive.
    """

    core: tuple[int, int, int, int]
    outer: tuple[int, int, int, int]


@dataclass(frozen=True)
class TilePlan:
    """How an image of ``height`` x ``width`` is cut: core side, halo and the tiles, row by row."""

    height: int
    width: int
    core: int
    halo: int
    tiles: tuple[Tile, ...]

    @property
    def largest(self) -> tuple[int, int]:
        """(h, w) of the largest outer box: what one tile's pass costs."""
        return (max(t.outer[1] - t.outer[0] for t in self.tiles), max(t.outer[3] - t.outer[2] for t in self.tiles))


def layer_geometry(name: str) -> tuple[int, int, int]:
    """(receptive field px, stride px, reach px) of a VGG19 layer's features.

    ``reach`` is how far a feature's receptive field extends beyond its own
    stride-sized cell on each side (70 px at relu5_1): the halo a tile needs.
    """
    field, stride, reach = 1, 1, 0
    for layer, kind in LAYERS[: LAYER_INDEX[check_layers([name])[0]] + 1]:
        if kind == "conv":  # 3x3, padding 1
            field += 2 * stride
            reach += stride
        elif kind == "pool":  # 2x2, stride 2, no padding
            field += stride
            stride *= 2
    return field, stride, reach


def halo_for(layers: Sequence[str]) -> tuple[int, int]:
    """(halo px, alignment px) for these layers: the largest reach, rounded up to the deepest stride."""
    align = max(layer_geometry(n)[1] for n in layers)
    reach = max(layer_geometry(n)[2] for n in layers)
    return math.ceil(reach / align) * align, align


def plan_tiles(height: int, width: int, core: int, layers: Sequence[str], *, field: str = "tile") -> TilePlan:
    """Cut a ``height`` x ``width`` image into cores of ``core`` px (a multiple of the pooling stride).

    ``field`` names the setting the core size came from, for the error.
    """
    halo, align = halo_for(layers)
    if core < align or core % align:
        raise ConfigError(f"{field} is {core} px; expected a positive multiple of {align} px (the stride of "
                          f"layer {max(layers, key=LAYER_INDEX.get)})")

    def cuts(n: int) -> list[tuple[int, int, int, int]]:  # (core start, core end, outer start, outer end)
        starts = list(range(0, n, core))
        return [(a, min(a + core, n), max(0, a - halo), min(n, a + core + halo)) for a in starts]

    tiles = tuple(Tile((y0, y1, x0, x1), (oy0, oy1, ox0, ox1))
                  for y0, y1, oy0, oy1 in cuts(height) for x0, x1, ox0, ox1 in cuts(width))
    return TilePlan(height, width, core, halo, tiles)


def _core_slices(tile: Tile, stride: int) -> tuple[slice, slice, slice, slice]:
    """(rows, cols) of the core in the tile's feature map, then (rows, cols) in the whole image's.

    Offsets are multiples of the stride, so floor division maps cells exactly;
    a core ending at the image border ends where the whole map ends.
    """
    y0, y1, x0, x1 = tile.core
    oy0, _, ox0, _ = tile.outer
    s = stride
    return (slice((y0 - oy0) // s, (y1 - oy0) // s), slice((x0 - ox0) // s, (x1 - ox0) // s),
            slice(y0 // s, y1 // s), slice(x0 // s, x1 // s))


def _features(model: VGG19Features, pixels: Tensor, layers: Sequence[str], channels_last: bool) -> dict[str, Tensor]:
    """Features of a tile's pixels (RGB, or luminance shown as grey RGB)."""
    rgb = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
    if channels_last:
        rgb = rgb.contiguous(memory_format=torch.channels_last)
    return model(rgb, layers)


def _pixels(x: Tensor, tile: Tile) -> Tensor:
    """The tile's outer box of ``x`` (a view)."""
    oy0, oy1, ox0, ox1 = tile.outer
    return x[..., oy0:oy1, ox0:ox1]


def _strides(layers: Sequence[str]) -> dict[str, int]:
    return {n: layer_geometry(n)[1] for n in layers}


@torch.no_grad()
def tiled_features(model: VGG19Features, x: Tensor, layers: Sequence[str], plan: TilePlan,
                   channels_last: bool) -> dict[str, Tensor]:
    """The whole image's features at ``layers``, assembled from tile cores (e.g. content targets)."""
    out: dict[str, Tensor] = {}
    strides = _strides(layers)
    for tile in plan.tiles:
        for n, f in _features(model, _pixels(x, tile), layers, channels_last).items():
            rows, cols, grows, gcols = _core_slices(tile, strides[n])
            if n not in out:  # (b, c, h, w) of the whole map
                out[n] = f.new_empty(*f.shape[:2], plan.height // strides[n], plan.width // strides[n])
            out[n][..., grows, gcols] = f[..., rows, cols]
    return out


@torch.no_grad()
def tiled_grams(model: VGG19Features, x: Tensor, layers: Sequence[str], plan: TilePlan,
                channels_last: bool) -> dict[str, Tensor]:
    """{layer: (b, c, c)} float32 Gram matrices of the whole image divided by c*h*w, summed over cores."""
    sums: dict[str, Tensor] = {}
    for tile in plan.tiles:
        _add(sums, _run_tile(model, x, tile, _tile_spec(tile, layers), channels_last, grad=False)[2])
    return _normalized(sums, plan)


def _add(sums: dict[str, Tensor], grams: dict[str, Tensor]) -> None:
    """Add a tile's Gram sums (not yet normalized) into ``sums``."""
    for n, g in grams.items():
        sums[n] = g.detach().clone() if n not in sums else sums[n].add_(g.detach())


def _normalized(sums: dict[str, Tensor], plan: TilePlan) -> dict[str, Tensor]:
    for n, g in sums.items():
        s = layer_geometry(n)[1]
        g.div_(g.shape[1] * (plan.height // s) * (plan.width // s))
    return sums


def _tile_spec(tile: Tile, style: Sequence[str], content: dict[str, tuple[Tensor, float]] | None = None,
               sizes: dict[str, int] | None = None) -> TileSpec:
    """The tile's part of the terms: its core in each layer's map, the Gram sums of the ``style`` layers,
    and the ``content`` terms ({layer: (whole-map target, weight)}; ``sizes``: c*h*w of each whole map)."""
    content = content or {}
    core, terms = {}, {}
    for n in set(style) | set(content):
        rows, cols, grows, gcols = _core_slices(tile, layer_geometry(n)[1])
        core[n] = (rows, cols)
        if n in content:
            target, weight = content[n]
            terms[n] = (target[..., grows, gcols], weight / sizes[n])
    return TileSpec(core, terms, tuple(style))


def _run_tile(model: VGG19Features, x: Tensor, tile: Tile, spec: TileSpec, channels_last: bool,
              grad: bool) -> tuple[Tensor | None, Tensor, dict[str, Tensor]]:
    """(leaf, content loss (b,), Gram sums) of one tile's pass (``fused.tile_terms``); with ``grad``,
    ``leaf`` is the tile's pixels as a leaf that the pass's graph leads back to, else None."""
    pixels = _pixels(x, tile).detach()
    leaf = pixels.requires_grad_(True) if grad else None
    with torch.set_grad_enabled(grad):
        rgb = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels  # luminance as grey RGB
        content, grams = tile_terms(model.preprocess(rgb.float()), model, spec, channels_last)
    return leaf, content, grams


def _gram_pass(model: VGG19Features, x: Tensor, spec: LossSpec, plan: TilePlan, sizes: dict[str, int],
               channels_last: bool, keep_last: bool) -> tuple[dict[str, Tensor], tuple | None]:
    """Pass 1: the global Grams of the style layers. With ``keep_last``, the last tile runs with its
    graph and its content terms, and comes back as (tile, leaf, content, Gram sums): pass 2 starts with
    it, with no forward pass of its own (one tile's forward less per evaluation: a quarter of the Gram
    pass with 4 tiles)."""
    sums: dict[str, Tensor] = {}
    kept = None
    for i, tile in enumerate(plan.tiles):
        last = keep_last and i == len(plan.tiles) - 1
        terms = _tile_spec(tile, list(spec.style), spec.content if last else None, sizes)
        leaf, content, grams = _run_tile(model, x, tile, terms, channels_last, grad=last)
        _add(sums, grams)
        if last:
            kept = (tile, leaf, content, grams)
    return _normalized(sums, plan), kept


def _layer_sizes(plan: TilePlan, layers: Sequence[str], channels: dict[str, int]) -> dict[str, int]:
    """c*h*w of each layer's whole map (per image): the losses' normalization."""
    return {n: channels[n] * (plan.height // s) * (plan.width // s) for n, s in _strides(layers).items()}


class _TiledLoss(torch.autograd.Function):
    """(image) -> (weighted content + style + TV (b,), content (b,), style (b,), TV (b,)); the gradient is
    computed up front, into one image-sized buffer that the backward scales in place."""

    @staticmethod
    def forward(ctx, x: Tensor, model: VGG19Features, spec: LossSpec, plan: TilePlan, channels_last: bool,
                timings: dict[str, float], tv_weight: float):
        b = x.shape[0]
        wanted = ctx.needs_input_grad[0]
        channels = {n: t.shape[1] for n, (t, _) in spec.content.items()}
        channels.update({n: t.shape[-1] for n, (t, _) in spec.style.items()})
        sizes = _layer_sizes(plan, list(channels), channels)
        style = torch.zeros(b, dtype=torch.float32, device=x.device)
        upstream: dict[str, Tensor] = {}  # d style loss / d (Gram sum over every tile), per layer
        kept = None
        if spec.style:
            started = time.perf_counter()
            grams, kept = _gram_pass(model, x, spec, plan, sizes, channels_last, keep_last=wanted)
            timings["gram pass"] = timings.get("gram pass", 0.0) + time.perf_counter() - started
            for n, (target, weight) in spec.style.items():
                diff = grams[n] - target  # (b, c, c)
                c = diff.shape[1]
                style += weight * diff.pow(2).flatten(1).mean(1)
                # d/dS of weight * mean((S / size - A)^2), S the Gram sum
                upstream[n] = diff * (2 * weight / (c * c * sizes[n]))
        content = torch.zeros(b, dtype=torch.float32, device=x.device)
        grad = torch.zeros_like(x, dtype=torch.float32) if wanted else None
        order = list(plan.tiles) if kept is None else [kept[0]] + [t for t in plan.tiles if t is not kept[0]]
        for tile in order:  # pass 2, from the tile pass 1 left with its graph
            started = time.perf_counter()
            if kept is not None and tile is kept[0]:
                (_, leaf, part, sums), kept = kept, None
            else:
                terms = _tile_spec(tile, list(spec.style), spec.content, sizes)
                leaf, part, sums = _run_tile(model, x, tile, terms, channels_last, grad=wanted)
            content += part.detach()
            backward_from = time.perf_counter()
            if grad is not None:
                torch.autograd.backward([part] + [sums[n] for n in spec.style],
                                        [torch.ones_like(part)] + [upstream[n] for n in spec.style])
                _pixels(grad, tile).add_(leaf.grad)
            del leaf, part, sums  # the tile's activations go before the next tile runs
            now = time.perf_counter()
            timings["forward"] = timings.get("forward", 0.0) + backward_from - started
            timings["backward"] = timings.get("backward", 0.0) + now - backward_from
        tv = tv_and_grad(x, tv_weight, grad) if tv_weight else torch.zeros_like(content)
        ctx.grad = grad
        ctx.mark_non_differentiable(content, style, tv)
        return content + style + tv, content, style, tv

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_content, _grad_style, _grad_tv):
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(grad_total.view(-1, *([1] * (grad.dim() - 1)))), None, None, None, None, None, None


def tiled_feature_losses(x: Tensor, model: VGG19Features, spec: LossSpec, plan: TilePlan, channels_last: bool,
                         timings: dict[str, float] | None = None,
                         tv_weight: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weighted (content + style + TV, content, style, TV) per image of ``x`` (RGB or luminance in 0-1),
    tile by tile; TV (``losses.TVLoss`` times ``tv_weight``) on the whole image.

    Only the first is differentiable in ``x``: its gradient is computed during
    the call (a graph over every tile would hold the whole image's
    activations, which is what tiling avoids). Content targets in ``spec`` are
    whole-image feature maps (see ``tiled_features``). ``timings``, when
    given, accumulates seconds spent in the Gram pass, the tiles' forward
    passes and their backward passes.
    """
    return _TiledLoss.apply(x, model, spec, plan, channels_last, {} if timings is None else timings, tv_weight)

