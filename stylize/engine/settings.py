"""Engine settings: one validated, immutable object per job.

Every field has a ``description``: its first sentence (up to the first ". ")
says what the setting is and becomes the command line's help; the rest says
why the default is what it is. The CLI's engine flags are generated from
these fields (``stylize/app/flags.py``), so a new field is a new flag; mark
one ``json_schema_extra={"cli": False}`` to keep it off the command line, and
give ``{"metavar": ...}`` for its placeholder. The resolved settings are saved
with every output (see ``metadata.py``), and they are part of the job key, so
a changed setting reruns a job.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stylize.engine.vgg19 import LAYER_NAMES

Format = Literal["png", "jpeg", "webp", "tiff", "png16"]

#: Units that max_memory accepts, in bytes.
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30}


class Settings(BaseModel):
    """Everything that decides the picture a job produces.

    The device is deliberately not here: it decides where a job runs, not what
    it produces, so it is a run option rather than a job setting.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    size: int = Field(512, ge=16, le=65536, json_schema_extra={"metavar": "PX"}, description=(
        "Longest side of the output in pixels. 512 is where VGG19's receptive fields (about 200 px at "
        "relu5_1) still see whole brush strokes while a CPU run finishes in minutes; the paper's figures "
        "are about this size. Beyond 65536 (the largest max_pixels allows) nothing fits; below, max_pixels "
        "is the limit, and its error names the size that fits."))
    iterations: int = Field(500, ge=0, le=100000, json_schema_extra={"metavar": "N"}, description=(
        "L-BFGS iterations at full size. With --scales N, each coarser level runs up to the same number at "
        "a quarter of the cost per halving (at most a third extra in all); early stopping (--tolerance) "
        "usually ends every level sooner. 500 is where jcjohnson/neural-style's default (1000) has visually "
        "converged for 512 px images."))

    # Loss weights. Losses are normalized per element (see losses.py), so the
    # balance is the same at 256 and at 1024 px.
    content_weight: float = Field(1.0, ge=0, json_schema_extra={"metavar": "W"}, description=(
        "Content loss weight. 1 is the reference that the other weights balance against."))
    style_weight: float = Field(10.0, ge=0, json_schema_extra={"metavar": "W"}, description=(
        "Style loss weight. Against content 1 (Caffe features are on a 0-255 scale, so raw losses are "
        "large), 10 gives a clear painting texture with the photo's structure intact on the sample images; "
        "0.3 barely changes the photo and 30 starts to dissolve it."))
    tv_weight: float = Field(1e5, ge=0, json_schema_extra={"metavar": "W"}, description=(
        "Total-variation weight. TV is a mean of squared 0-1 pixel differences (~1e-2), hence the large "
        "weight: enough to suppress the speckle that the Gram loss leaves in flat regions (under 1% of the "
        "total), not enough to blur strokes."))

    content_layers: tuple[str, ...] = Field(("relu4_2",), json_schema_extra={"metavar": "LAYER"}, description=(
        "VGG19 layers whose features the content loss matches. Gatys et al. 2015 use conv4_2; we take its "
        "ReLU, as most reimplementations do."))
    style_layers: tuple[str, ...] = Field(
        ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"), json_schema_extra={"metavar": "LAYER"},
        description="VGG19 layers whose Gram matrices the style loss matches. The first ReLU of each block, "
                    "as in Gatys et al. 2015.")
    style_layer_weights: tuple[float, ...] | None = Field(None, json_schema_extra={"metavar": "W"}, description=(
        "Weights of the style layers, one per layer (default equal). Equal weights are the paper's "
        "w_l = 1/5; they are normalized to sum to 1."))

    style_blend: tuple[float, ...] | None = Field(None, json_schema_extra={"metavar": "W"}, description=(
        "Blend weights, one per style image (default equal). Normalized to sum to 1."))
    style_scale: float = Field(1.0, gt=0, le=8, json_schema_extra={"metavar": "F"}, description=(
        "Style image size relative to the output's longest side. 1.0 matches the scale of strokes in the "
        "painting to the output."))
    preserve_color: bool = Field(False, description=(
        "Keep the content's colours (luminance-only transfer). As in Gatys et al. 2016; off by default, "
        "since the painting's palette is usually part of its style."))

    optimizer: Literal["lbfgs", "adam"] = Field("lbfgs", description=(
        "The optimizer. L-BFGS (the paper's choice) converges in far fewer evaluations than Adam on this "
        "problem; Adam is kept for memory-tight runs."))
    learning_rate: float | None = Field(None, gt=0, json_schema_extra={"metavar": "LR"}, description=(
        "Step size (default 1 for L-BFGS, 0.02 for Adam). L-BFGS: the scale of the first step (later steps "
        "come from its curvature estimate). Adam: per-pixel step in 0-1 RGB units; 0.02 is about 5 grey "
        "levels, large enough to move fast, small enough not to ring."))
    init: str = Field("content", json_schema_extra={"metavar": "content|random|PATH"}, description=(
        "Starting image: content, random (seeded noise) or an image's path or URI. The content image is "
        "fast and keeps the photo's structure; random gives more style."))
    seed: int = Field(0, ge=0, le=2**63 - 1, json_schema_extra={"metavar": "SEED"}, description=(
        "Seed for random init; the same seed gives the same output on the CPU. It also makes CPU runs "
        "bit-for-bit reproducible."))

    weights: str = Field("caffe", json_schema_extra={"metavar": "caffe|torchvision|PATH"}, description=(
        "VGG19 weight set: caffe, torchvision or a state-dict file. The original Caffe-trained network "
        "gives markedly better textures than the torchvision retraining."))
    pooling: Literal["max", "avg"] = Field("max", description=(
        "VGG19 pooling. Max pooling as in the paper; average pooling gives smoother gradients (the paper "
        "mentions slightly more appealing results)."))

    scales: int = Field(2, ge=1, le=6, json_schema_extra={"metavar": "N"}, description=(
        "Coarse-to-fine levels, each half the size of the next; 1 is full size only. Two levels let the "
        "coarse pass settle the large-scale layout cheaply (1/4 the cost per iteration), so the full-size "
        "pass needs fewer iterations."))
    tolerance: float = Field(1e-3, ge=0, lt=1, json_schema_extra={"metavar": "F"}, description=(
        "Stop a level when the loss improves by less than this fraction over tolerance_window (20) "
        "iterations; 0 disables early stopping. 1e-3 over 20 iterations is below what the eye can see at "
        "that point."))
    stop: Literal["done", "converged"] = Field("done", description=(
        "When a level stops early: done, near the quality of 500 fixed iterations, or converged, when the "
        "loss has all but stopped improving (the higher-quality preset). done stops a level once its best loss "
        "improves by less than schedule.DONE_TOLERANCE over tolerance_window iterations (or less than "
        "tolerance, if that is larger); converged stops only below tolerance, the default before issue 15. "
        "At 512 px (2026-12-07) done cost 0.36x the full-size iterations of converged for a judged loss "
        "0.85% higher (and 8% lower than 200 fixed float32 iterations): for catalogs, near 3x the throughput. "
        "benchmarks/engine_quality.py measures both. tolerance 0 disables early stopping in both."))
    tolerance_window: int = Field(20, ge=1, le=100000, json_schema_extra={"cli": False}, description=(
        "Iterations over which --tolerance measures the improvement. 20 spans the noise of single L-BFGS "
        "steps. Not a command-line flag: it only refines --tolerance."))
    save_every: int = Field(0, ge=0, le=100000, json_schema_extra={"metavar": "N"}, description=(
        "Save an intermediate image every N iterations; 0 never. Off by default: each save is an encode "
        "and a write."))

    format: Format = Field("png", json_schema_extra={"cli": False}, description=(
        "Output encoding: png, jpeg, webp, tiff (16-bit) or png16 (16-bit PNG). PNG is lossless; the 16-bit "
        "formats keep the optimized image's precision, so smooth gradients in a large print do not band. "
        "Not a command-line flag: `stylize image` takes it from the output's extension, manifests set it "
        "per job."))
    dpi: int | None = Field(None, ge=1, le=100000, json_schema_extra={"metavar": "DPI"}, description=(
        "Resolution written into the output file, in dots per inch; unset writes none. A print shop reads it "
        "as the print size: 4096 px at 300 dpi is 34.7 cm. It does not change the pixels."))
    quality: int = Field(95, ge=1, le=100, json_schema_extra={"metavar": "Q"}, description=(
        "JPEG/WebP quality. 95 keeps brush-stroke detail free of visible artefacts at about a third of "
        "PNG's size."))

    precision: Literal["auto", "float32", "bfloat16"] = Field("auto", description=(
        "VGG pass precision; auto uses bf16 where the hardware runs it fast. That is CUDA with bf16, and "
        "CPUs with AVX-512 BF16 or AMX; float32 elsewhere. Gram matrices and losses are always accumulated "
        "in float32."))
    max_pixels: int = Field(4096 * 4096, ge=256, le=2**32, json_schema_extra={"metavar": "N"}, description=(
        "Pixel budget per output. 4096x4096 by default; a job over it (its size squared is the worst case) is refused "
        "before any work, with the size that would fit."))
    max_memory: str | None = Field(None, json_schema_extra={"metavar": "SIZE"}, description=(
        "Memory budget of the engine's peak use, e.g. 6GiB or 500MB; unset uses the device's free memory. "
        "An output whose whole-image pass does not fit is optimized in tiles with exact global style "
        "statistics (the same picture, a little slower), and the L-BFGS history is shortened to fit; a "
        "budget below one tile is refused before any work."))
    shrink_on_oom: bool = Field(False, description=(
        "Retry a job that runs out of device memory once at 0.7x the size, recorded as retried_at_size. "
        "Off by default: an output silently smaller than asked is not what a print needs; the engine first "
        "retries with smaller tiles, which keeps the size."))
    tile: int | None = Field(None, ge=16, le=65536, json_schema_extra={"metavar": "PX"}, description=(
        "Force tiled optimization with tile cores of this many pixels (a multiple of 16); unset decides from "
        "max_memory. Each tile also computes a halo of 80 px around its core for the default layers, so "
        "cores under 256 px spend most of their time on halos."))

    @field_validator("max_memory")
    @classmethod
    def _memory_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)  # raises ValueError naming the accepted forms
        return value

    @field_validator("tile")
    @classmethod
    def _tile_stride(cls, value: int | None) -> int | None:
        if value is not None and value % 16:
            raise ValueError(f"must be a multiple of 16 px (VGG19's pooling stride at relu5_1), found {value}; "
                             f"try {max(16, round(value / 16) * 16)}")
        return value

    def memory_budget(self) -> int | None:
        """``max_memory`` in bytes, or None when unset."""
        return None if self.max_memory is None else parse_size(self.max_memory)

    @field_validator("content_layers", "style_layers")
    @classmethod
    def _known_layers(cls, layers: tuple[str, ...]) -> tuple[str, ...]:
        if not layers:
            raise ValueError("must name at least one layer")
        unknown = [name for name in layers if name not in LAYER_NAMES]
        if unknown:
            raise ValueError(
                f"unknown VGG19 layer {', '.join(map(repr, unknown))}; "
                f"known layers: {', '.join(LAYER_NAMES)}"
            )
        return layers

    @field_validator("style_layer_weights", "style_blend")
    @classmethod
    def _weights_valid(cls, weights: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if weights is None:
            return None
        if not weights:
            raise ValueError("must not be empty (leave it out for equal weights)")
        for w in weights:
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weights must be finite and >= 0, found {w}")
        if sum(weights) <= 0:
            raise ValueError("at least one weight must be positive")
        return weights

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.style_layer_weights is not None and len(self.style_layer_weights) != len(self.style_layers):
            raise ValueError(
                f"style_layer_weights has {len(self.style_layer_weights)} values "
                f"but style_layers has {len(self.style_layers)} layers"
            )
        if self.size * self.size > self.max_pixels:
            fit = int(math.isqrt(self.max_pixels))
            raise ValueError(
                f"size {self.size} needs up to {self.size * self.size} pixels, over the "
                f"budget max_pixels={self.max_pixels}; use size <= {fit} or raise max_pixels"
            )
        return self

    def blend(self, n_styles: int) -> tuple[float, ...]:
        """Normalized blend weights for ``n_styles`` style images."""
        weights = self.style_blend or (1.0,) * n_styles
        if len(weights) != n_styles:
            from stylize.errors import ConfigError

            raise ConfigError(
                f"style_blend has {len(weights)} weights but there are {n_styles} style images"
            )
        total = sum(weights)
        return tuple(w / total for w in weights)

    def layer_weights(self) -> tuple[float, ...]:
        """Per-style-layer weights, normalized to sum to 1."""
        weights = self.style_layer_weights or (1.0,) * len(self.style_layers)
        total = sum(weights)
        return tuple(w / total for w in weights)

    def step_size(self) -> float:
        """The learning rate actually used for this optimizer."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1.0 if self.optimizer == "lbfgs" else 0.02


def parse_size(text: str) -> int:
    """'6GiB', '500MB', '2g' or a plain byte count -> bytes (binary units for K/M/G alone)."""
    raw = str(text).strip().replace(" ", "")
    number = raw.rstrip("KMGTBibkmgt")
    unit = raw[len(number):].upper()
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a size such as 6GiB, 512MiB, 8GB or a byte count, found {text!r}")
    return int(value * _UNITS[unit])


def settings_error_problems(exc, prefix: str = "") -> list[tuple[str, str]]:
    """Turn a pydantic ValidationError into (field path, message) pairs."""
    problems = []
    for err in exc.errors():
        loc = prefix
        for part in err["loc"]:
            if isinstance(part, int):
                loc += f"[{part}]"
            else:
                loc += f".{part}" if loc else str(part)
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        problems.append((loc, msg))
    return problems
