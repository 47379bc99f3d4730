"""The objective of a batch: weighted content, style and total-variation losses, one value per image.

``Objective`` evaluates them with the fused pass (``fused.py``), through
autograd over the modules of ``losses.py`` (the reference), or tile by tile
(``tiled.py``) for prints that do not fit the device at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from stylize.engine.features import LAYER_INDEX, VGG19Features
from stylize.engine.fused import LossSpec, feature_losses
from stylize.engine.losses import ContentLoss, StyleLoss, TVLoss, Valid
from stylize.engine.settings import Settings
from stylize.engine.tiled import TilePlan, layer_geometry, tiled_feature_losses
from stylize.errors import ConfigError


@dataclass
class Anchor:
    """A print's top level also matches its preview: ``objective`` (the preview level's content and style
    terms, without TV) evaluated on ``shrink(image)``, the level's image resized to the preview's size.

    The Gram matrices of a 2048 px image and of its 512 px copy differ: VGG's middle layers see different
    bands of the picture at each size. Optimizing the top levels against their own size's terms alone let
    the preview's look wash out (judged at 512 px, a default 2048 px print's style loss was 7.4x its
    preview's, 6-8x in relu2_1-relu4_1). Keeping the preview's terms in the objective keeps that look and
    lets the top levels add detail on top: the multi-scale idea of Snelgrove (2017), "High-resolution
    multi-scale neural texture synthesis", with one coarse scale. It costs one whole pass at the preview's
    size per evaluation (1/16 of a 2048 px level's pixels).
    """

    objective: "Objective"
    shrink: Callable[[Tensor], Tensor]


class Objective(nn.Module):
    """Weighted content + style + TV loss of a batch of images, per image.

    ``valid`` (``losses.Valid``): the batch holds photos of different shapes padded to one size
    (``layout.py``); each image's losses are then those it has alone. Not with ``tiles``.
    """

    def __init__(
        self,
        features: VGG19Features,
        settings: Settings,
        content_features: dict[str, Tensor],
        style_grams: dict[str, Tensor],
        dtype: torch.dtype,
        channels_last: bool,
        fused: bool = True,
        tiles: TilePlan | None = None,
        valid: Valid | None = None,
        anchor: Anchor | None = None,
    ):
        super().__init__()
        if tiles is not None and valid is not None:
            raise ConfigError("a padded batch of mixed shapes cannot be tiled; run its images one by one")
        self.features = features
        self.content_layers = list(settings.content_layers)
        self.style_layers = list(settings.style_layers)
        self.layers = sorted(set(self.content_layers) | set(self.style_layers), key=LAYER_INDEX.get)
        self.content = nn.ModuleDict({n: ContentLoss(content_features[n]) for n in self.content_layers})
        self.style = nn.ModuleDict({n: StyleLoss(style_grams[n]) for n in self.style_layers})
        self.layer_weights = dict(zip(self.style_layers, settings.layer_weights()))
        self.tv = TVLoss()
        self.weights = (settings.content_weight, settings.style_weight, settings.tv_weight)
        self.dtype = dtype
        self.channels_last = channels_last
        self.fused = fused
        self.tiles = tiles  # evaluate tile by tile (stylize.engine.tiled): same losses, bounded memory
        self.valid = valid
        self.anchor = anchor
        self.timings: dict[str, float] = {}  # seconds per part of the tiled evaluation, for benchmarks
        wc, ws, _ = self.weights
        # The same losses and weights for the fused pass (see stylize.engine.fused).
        self.spec = LossSpec(
            content={n: (self.content[n].target, wc / len(self.content_layers)) for n in self.content_layers},
            style={n: (self.style[n].target, ws * self.layer_weights[n]) for n in self.style_layers},
        )

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        total, content, style, tv = self._own(image)
        if self.anchor is not None:
            _, a_content, a_style, _ = self.anchor.objective(self.anchor.shrink(image))
            total, content, style = total + a_content + a_style, content + a_content, style + a_style
        return total, content, style, tv

    def _own(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rgb = image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image  # luminance -> grey RGB
        wc, ws, wt = self.weights
        if self.tiles is not None:
            return tiled_feature_losses(image, self.features, self.spec, self.tiles, self.channels_last,
                                        self.timings, wt)
        if self.fused:
            content, style = feature_losses(self.features.preprocess(rgb.float()), self.features, self.spec,
                                            self.channels_last, self.valid)
        else:  # autograd through the modules: the reference, and what torch.compile can trace
            feats = run_features(self.features, rgb, self.layers, self.dtype, self.channels_last, self.valid)
            at = {n: None if self.valid is None else self.valid.at_stride(layer_geometry(n)[1]) for n in feats}
            content = wc * sum(self.content[n](feats[n], at[n]) for n in self.content_layers) / len(self.content_layers)
            style = ws * sum(self.layer_weights[n] * self.style[n](feats[n], at[n]) for n in self.style_layers)
        tv = wt * self.tv(image, self.valid)
        return content + style + tv, content, style, tv  # each (b,)


def run_features(
    model: VGG19Features, rgb: Tensor, layers: Sequence[str], dtype: torch.dtype, channels_last: bool,
    valid: Valid | None = None,
) -> dict[str, Tensor]:
    """Run the VGG pass with the chosen memory format. ``model`` already holds its
    weights in ``dtype`` (see ``Engine.features``): a bf16 copy of the network, rather
    than autocast, which would re-cast every frozen weight on every pass. ``valid``:
    a padded batch's regions (``VGG19Features.forward``)."""
    if channels_last:
        rgb = rgb.contiguous(memory_format=torch.channels_last)
    return model(rgb, layers, valid)

