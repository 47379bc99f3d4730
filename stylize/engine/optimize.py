"""The Gatys et al. optimization: an image is optimized so that its VGG19
features match the content photo's and its Gram matrices match the painting's.

``Engine`` holds the network on one device (loaded once) and runs jobs;
``StyleTargets`` holds a style's Gram matrices per size, computed once and
reused across many content images. The loop reports one ``Record`` per loss
evaluation to a callback and returns them all with the ``Result``; it never
prints.

The optimized variable is the RGB image in 0-1 (or its luminance, with
``preserve_color``), whatever the weight set: each weight set applies its own
preprocessing inside the network, so learning rates, noise and total
variation mean the same for all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from stylize.engine import images
from stylize.errors import Cancelled, ConfigError, InputError, OptimizationError
from stylize.engine.features import LAYER_INDEX, VGG19Features, min_side, resolve_weights
from stylize.engine.fused import LossSpec, feature_losses
from stylize.engine.losses import ContentLoss, StyleLoss, TVLoss, gram
from stylize.engine.malloc import retain_freed_memory
from stylize.engine.budget import MemoryPlan, plan_memory, smaller_tile
from stylize.engine.settings import Settings
from stylize.engine.tiled import TilePlan, plan_tiles, tiled_feature_losses, tiled_features, tiled_grams

log = logging.getLogger(__name__)

#: Coarse levels below this longest side carry too little structure to help.
MIN_LEVEL_SIZE = 64
#: Prints: above this longest side the schedule adds coarse levels down to PRINT_BASE px and gives each
#: level above it fewer iterations (``level_iterations``), so that a 4096 px print costs a few 1024 px
#: runs rather than 16. Up to 1024 px the schedule is ``scales`` and ``iterations`` as given.
PRINT_FROM = 1024
PRINT_BASE = 512
PRINT_MIN_ITERATIONS = 5
#: L-BFGS history length. jcjohnson/neural-style and torch use 100; 50 halves
#: the memory (2 * 50 image-sized vectors) with no visible difference here.
LBFGS_HISTORY = 50
#: Largest per-pixel change (0-1 RGB units) of L-BFGS's first step: about 2.5 grey levels.
FIRST_STEP = 1e-2


@dataclass(frozen=True)
class Record:
    """One loss evaluation. Losses are weighted as they enter the total."""

    iteration: int  # evaluations so far in the whole run; 0 is the starting image
    scale: int  # level, 1 = coarsest, ``scales`` = full size
    total: float
    content: float
    style: float
    tv: float
    seconds: float  # since the run started


@dataclass
class Result:
    """The stylized image and how it was made."""

    image: Image.Image
    records: list[Record]
    seconds: float
    device: str
    precision: str
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (w, h) per level, coarse to fine
    stopped_early: list[bool] = field(default_factory=list)  # per level
    # Per level: tiles (core, halo, count; tile None = whole image), L-BFGS history, the memory estimate
    # and budget; and the peak memory of the run (CUDA: allocated; CPU: the process's peak RSS).
    memory: list[dict] = field(default_factory=list)
    peak_memory: int | None = None
    pixels: Tensor | None = None  # (3, h, w) float32 in 0-1 on the CPU: what 16-bit outputs are written from


RecordCallback = Callable[[Record], None]
SnapshotCallback = Callable[[int, int, Image.Image], None]  # (iteration, scale, image)


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; ``cuda:N`` must exist."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' asked for, but Apple MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU runs bf16 convolutions natively (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(spec: str, device: torch.device) -> torch.dtype:
    """The dtype of the VGG pass: bf16 where it is fast and supported, else float32."""
    if spec == "float32":
        return torch.float32
    if spec == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


#: Device memory per output pixel of one image in a batch: VGG19 activations to
#: relu5_1 kept for the backward pass (about 580 values per pixel over the
#: five blocks), their gradients, and the L-BFGS history (2 x 50 x 3 floats),
#: rounded up. An estimate for sizing batches, not a guarantee.
BYTES_PER_PIXEL = {torch.bfloat16: 3500, torch.float32: 6000}


#: Images per batch on the CPU in float32. Two images per oneDNN call keep the
#: cores busier than one: 0.91x and 0.98x the time per image in two runs of
#: benchmarks/engine.py at 512 px (2026-11-27), for about 1.45x the peak RSS.
#: In bfloat16 a batch of two was 1.16x and 1.01x, so 1.
CPU_FLOAT32_BATCH = 2


def available_memory() -> int | None:
    """Bytes of RAM available to new allocations (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def max_batch(device: torch.device, pixels: int, dtype: torch.dtype, *, cap: int = 32) -> int:
    """How many images of ``pixels`` output pixels fit one batch on ``device``.

    CUDA: from the free memory (70% of it, leaving room for the allocator and
    cuDNN workspaces). CPU: ``CPU_FLOAT32_BATCH`` in float32 when half the
    available RAM holds them, else 1. Elsewhere 1.
    """
    per_image = BYTES_PER_PIXEL.get(dtype, BYTES_PER_PIXEL[torch.float32]) * pixels
    if device.type == "cpu" and dtype == torch.float32:
        free = available_memory()
        return CPU_FLOAT32_BATCH if free is not None and CPU_FLOAT32_BATCH * per_image <= free // 2 else 1
    if device.type != "cuda":
        return 1
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, min(cap, int(0.7 * free // per_image)))


def print_scales(settings: Settings) -> int:
    """Levels for ``settings.size``: ``scales``, or above PRINT_FROM enough that the coarsest is at most PRINT_BASE."""
    if settings.size <= PRINT_FROM:
        return settings.scales
    return max(settings.scales, 1 + math.ceil(math.log2(settings.size / PRINT_BASE)))


def level_iterations(longest: int, settings: Settings) -> int:
    """Iterations of a level whose longest side is ``longest``: ``iterations``, fewer above PRINT_FROM.

    A level above PRINT_FROM px gets ``iterations * (PRINT_FROM / longest) ** 2``
    (at least PRINT_MIN_ITERATIONS), so each print level costs about what a
    PRINT_FROM level does: the composition comes from the coarse levels, the
    top levels add brush detail.
    """
    if longest <= PRINT_FROM or settings.iterations == 0:
        return settings.iterations
    return max(min(PRINT_MIN_ITERATIONS, settings.iterations), round(settings.iterations * (PRINT_FROM / longest) ** 2))


def level_sizes(width: int, height: int, settings: Settings) -> list[tuple[int, int]]:
    """(w, h) for each coarse-to-fine level; each level is half the next, the last is ``size``."""
    sizes = []
    scales = print_scales(settings)
    for k in range(scales):
        longest = round(settings.size / 2 ** (scales - 1 - k))
        if k < scales - 1 and longest < MIN_LEVEL_SIZE:
            continue
        sizes.append(images.fit_size(width, height, longest))
    return sizes


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products of (b, n) tensors -> (b,), without an (b, n) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])


class BatchedLBFGS:
    """L-BFGS without line search (as torch.optim.LBFGS and neural-style use it),
    for a batch of independent images: each image has its own history, step and
    curvature scale, so a batch gives the same iterates as running each image alone.

    ``step(evaluate)`` makes one update and evaluates once; ``evaluate()`` must
    return per-image losses, shape (b,), computed from ``x``.
    """

    def __init__(self, x: Tensor, *, lr: float = 1.0, history: int = LBFGS_HISTORY):
        self.x = x
        self.lr = lr
        self.history = history
        self.s: list[Tensor] = []  # each (b, n)
        self.y: list[Tensor] = []
        self.rho: list[Tensor] = []  # each (b,); 0 where the pair failed the curvature test
        self.gamma: Tensor | None = None  # (b,) initial Hessian scale
        self.curved = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # has a curvature pair
        self.g: Tensor | None = None  # (b, n) gradient at x

    def _loss_and_grad(self, evaluate: Callable[[], Tensor]) -> Tensor:
        self.x.grad = None
        loss = evaluate()  # (b,)
        loss.sum().backward()
        self.g = self.x.grad.detach().flatten(1).clone()  # (b, n)
        return loss.detach()

    def start(self, evaluate: Callable[[], Tensor]) -> Tensor:
        """Evaluate the starting point; returns its losses."""
        return self._loss_and_grad(evaluate)

    def _direction(self, g: Tensor) -> Tensor:
        """Two-loop recursion, per image. Dots are batched matrix products and updates
        fused multiply-adds, so no image-sized temporaries are made per history pair."""
        q = g.neg()
        alphas = []
        for s, y, rho in zip(reversed(self.s), reversed(self.y), reversed(self.rho)):
            alpha = rho * _dot(s, q)  # (b,)
            q.addcmul_(y, alpha[:, None], value=-1.0)
            alphas.append(alpha)
        if self.gamma is not None:
            q.mul_(self.gamma[:, None])
        for s, y, rho, alpha in zip(self.s, self.y, self.rho, reversed(alphas)):
            beta = rho * _dot(y, q)
            q.addcmul_(s, (alpha - beta)[:, None])
        return q  # (b, n)

    def step(self, evaluate: Callable[[], Tensor]) -> Tensor:
        """One update of every image in the batch, then one evaluation; returns the new losses."""
        g = self.g
        d = self._direction(g)
        # Until an image has a curvature pair, its step is scaled so that no
        # pixel moves more than FIRST_STEP (torch's rule, 1/|g|_1, gives steps
        # so small at image scale that float32 noise swamps the curvature pair).
        first = self.lr * FIRST_STEP / g.abs().amax(1).clamp_min(1e-30)  # (b,)
        t = torch.where(self.curved, torch.full_like(first, self.lr), first)
        s = t[:, None] * d
        with torch.no_grad():
            self.x.add_(s.view_as(self.x))
        loss = self._loss_and_grad(evaluate)
        y = self.g - g
        ys = _dot(y, s)
        yy = _dot(y, y)
        # Curvature test relative to the scale of y, so tiny (per-element
        # normalized) gradients are not mistaken for flat curvature.
        ok = ys > 1e-10 * yy.clamp_min(1e-30)
        self.s.append(s)
        self.y.append(y)
        self.rho.append(torch.where(ok, 1.0 / ys.where(ok, torch.ones_like(ys)), torch.zeros_like(ys)))
        if len(self.s) > self.history:
            del self.s[0], self.y[0], self.rho[0]
        self.curved |= ok
        new_gamma = ys / yy.clamp_min(1e-30)
        self.gamma = new_gamma.where(ok, self.gamma if self.gamma is not None else torch.ones_like(ys))
        return loss


class Objective(nn.Module):
    """Weighted content + style + TV loss of a batch of images, per image."""

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
    ):
        super().__init__()
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
        self.timings: dict[str, float] = {}  # seconds per part of the tiled evaluation, for benchmarks
        wc, ws, _ = self.weights
        # The same losses and weights for the fused pass (see stylize.engine.fused).
        self.spec = LossSpec(
            content={n: (self.content[n].target, wc / len(self.content_layers)) for n in self.content_layers},
            style={n: (self.style[n].target, ws * self.layer_weights[n]) for n in self.style_layers},
        )

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rgb = image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image  # luminance -> grey RGB
        wc, ws, wt = self.weights
        if self.tiles is not None:
            features, content, style = tiled_feature_losses(image, self.features, self.spec, self.tiles,
                                                            self.channels_last, self.timings)
            tv = wt * self.tv(image)
            return features + tv, content, style, tv
        if self.fused:
            content, style = feature_losses(self.features.preprocess(rgb.float()), self.features, self.spec,
                                            self.channels_last)
        else:  # autograd through the modules: the reference, and what torch.compile can trace
            feats = run_features(self.features, rgb, self.layers, self.dtype, self.channels_last)
            content = wc * sum(self.content[n](feats[n]) for n in self.content_layers) / len(self.content_layers)
            style = ws * sum(self.layer_weights[n] * self.style[n](feats[n]) for n in self.style_layers)
        tv = wt * self.tv(image)
        return content + style + tv, content, style, tv  # each (b,)


def run_features(
    model: VGG19Features, rgb: Tensor, layers: Sequence[str], dtype: torch.dtype, channels_last: bool
) -> dict[str, Tensor]:
    """Run the VGG pass with the chosen memory format. ``model`` already holds its
    weights in ``dtype`` (see ``Engine.features``): a bf16 copy of the network, rather
    than autocast, which would re-cast every frozen weight on every pass."""
    if channels_last:
        rgb = rgb.contiguous(memory_format=torch.channels_last)
    return model(rgb, layers)


class StyleTargets:
    """Blended Gram matrices of one set of style images, per output size.

    Computed on first use for each size and kept, so a catalog of many photos
    over a few styles computes each style's Grams once per size and device.
    """

    def __init__(self, engine: "Engine", styles: Sequence[Image.Image], settings: Settings):
        if not styles:
            raise ConfigError("at least one style image is needed")
        self.engine = engine
        self.styles = list(styles)
        self.blend = settings.blend(len(styles))
        self.settings = settings
        self._cache: dict[tuple, dict[str, Tensor]] = {}
        self._lock = threading.Lock()

    def grams(self, longest: int, luminance: tuple[float, float] | None = None) -> dict[str, Tensor]:
        """{layer: (1, c, c)} for an output whose longest side is ``longest``.

        ``luminance`` (mean, std) switches to luminance-only style: each style
        image's luminance is matched to these moments (Gatys et al. 2016).
        """
        key = (longest, None if luminance is None else tuple(round(v, 4) for v in luminance))
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._compute(longest, luminance)
            return self._cache[key]

    @torch.no_grad()
    def _compute(self, longest: int, luminance: tuple[float, float] | None) -> dict[str, Tensor]:
        s = self.settings
        model = self.engine.features(s)
        dtype = self.engine.dtype(s)
        target = max(1, round(longest * s.style_scale))
        need = min_side(s.style_layers)
        blended: dict[str, Tensor] = {}
        for image, weight in zip(self.styles, self.blend):
            size = images.fit_size(*image.size, target)
            if min(size) < need:
                raise InputError(
                    f"style image scaled to {size[0]}x{size[1]} px is smaller than the {need} px "
                    f"that layer {s.style_layers[-1]} needs; raise style_scale or size"
                )
            x = images.to_tensor(images.resize(image, size), self.engine.device)
            if luminance is not None:
                y = images.rgb_to_yiq(x)[:, :1]
                y = (y - y.mean()) / y.std().clamp_min(1e-6) * luminance[1] + luminance[0]
                x = y.expand(-1, 3, -1, -1)
            tiles = self.engine.tile_plan(size[1], size[0], 1, 3, s)
            if tiles is None:
                feats = run_features(model, x, s.style_layers, dtype, self.engine.channels_last)
                grams = {name: gram(feats[name]) for name in s.style_layers}
            else:  # a print-size style image: its Grams summed over tiles
                grams = tiled_grams(model, x, s.style_layers, tiles, self.engine.channels_last)
            for name in s.style_layers:
                g = grams[name] * weight  # (1, c, c)
                blended[name] = blended[name] + g if name in blended else g
        return blended


class Engine:
    """VGG19 on one device, loaded once per weight set, and the optimization loop.

    Thread-safe for use by one job at a time per device; build one Engine per device.
    """

    def __init__(self, device: str | torch.device = "auto", *, channels_last: bool = True, tf32: bool = True,
                 cudnn_benchmark: bool = True, compile: bool = False, fused: bool = True,
                 retain_memory: bool = True):
        """``channels_last``: NHWC tensors, which oneDNN and cuDNN convolve fastest (about 1.8x
        on this CPU in float32). On CUDA, ``tf32`` lets float32 convolutions use TF32 tensor
        cores and ``cudnn_benchmark`` picks the fastest algorithm per shape (both process-wide
        switches in torch). ``compile`` wraps the network in ``torch.compile``. ``fused``
        computes the losses' gradient with ``stylize.engine.fused``'s hand-written backward pass
        instead of autograd (same values, less memory traffic); ``compile`` turns it off,
        as the compiler needs the autograd graph. ``retain_memory``, on CPU, keeps freed memory
        mapped in the process so that each iteration reuses the last one's pages (about 8%
        faster in float32 at 512 px; a process-wide glibc setting, see ``stylize.engine.malloc``)."""
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.channels_last = channels_last and self.device.type in ("cpu", "cuda")
        self.compile = compile
        self.fused = fused and not compile
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = cudnn_benchmark
        self.malloc = retain_freed_memory() if retain_memory and self.device.type == "cpu" else "not asked"
        self._models: dict[tuple, VGG19Features] = {}
        self._lock = threading.Lock()

    def features(self, settings: Settings) -> VGG19Features:
        """The VGG19 stack for the settings' weights, pooling and precision, up to relu5_4, cached."""
        dtype = self.dtype(settings)
        key = (settings.weights, settings.pooling, dtype)
        with self._lock:
            if key not in self._models:
                model = VGG19Features(resolve_weights(settings.weights), pooling=settings.pooling,
                                      truncate_after="relu5_4")
                model = model.to(device=self.device, dtype=dtype)
                if self.channels_last:
                    model = model.to(memory_format=torch.channels_last)
                if self.compile:
                    model = torch.compile(model, dynamic=True)
                self._models[key] = model
            return self._models[key]

    def dtype(self, settings: Settings) -> torch.dtype:
        """The dtype of the VGG pass for these settings on this device."""
        return resolve_precision(settings.precision, self.device)

    def style_targets(self, styles: Sequence[Image.Image], settings: Settings) -> StyleTargets:
        """Gram targets for these style images, reusable across content images."""
        return StyleTargets(self, styles, settings)

    @torch.no_grad()
    def judge(self, image: Image.Image, content: Image.Image, styles: Sequence[Image.Image],
              settings: Settings, *, size: int = 512) -> dict[str, float]:
        """Weighted content and style loss of a finished ``image``, measured the same way for every run.

        The image, the photo and the styles are resized so the longest side is
        ``size`` and evaluated in float32, whatever schedule, precision or
        size produced the image, so that runs with different schedules can be
        compared (lower is better). TV is left out: it judges smoothness, not
        likeness.
        """
        s = settings.model_copy(update={"precision": "float32", "size": size, "preserve_color": False})
        w, h = images.fit_size(*content.size, size)
        x = images.to_tensor(images.resize(image, (w, h)), self.device)
        c = images.to_tensor(images.resize(content, (w, h)), self.device)
        model = self.features(s)
        content_feats = run_features(model, c, s.content_layers, torch.float32, self.channels_last)
        grams = self.style_targets(styles, s).grams(max(w, h))
        _total, content_loss, style_loss, _tv = Objective(model, s, content_feats, grams, torch.float32,
                                                          self.channels_last, self.fused)(x)
        return {"content": content_loss.item(), "style": style_loss.item(),
                "total": content_loss.item() + style_loss.item()}

    def run(
        self,
        content: Image.Image,
        styles: Sequence[Image.Image] | StyleTargets,
        settings: Settings | None = None,
        *,
        init: Image.Image | None = None,
        callback: RecordCallback | None = None,
        snapshot: SnapshotCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> Result:
        """Stylize ``content`` with ``styles`` (images or precomputed targets).

        ``init`` is the starting image when ``settings.init`` names a file
        (the caller reads it). Raises ``InputError`` for unusable images,
        ``OptimizationError`` when the loss stops being finite, ``Cancelled``
        when ``cancel`` is set (checked at every loss evaluation).
        """
        return self.run_batch(
            [content], styles, settings, inits=[init],
            callback=None if callback is None else (lambda i, rec: callback(rec)),
            snapshot=None if snapshot is None else (lambda i, it, scale, image: snapshot(it, scale, image)),
            cancel=cancel,
        )[0]

    def run_batch(
        self,
        contents: Sequence[Image.Image],
        styles: Sequence[Image.Image] | StyleTargets,
        settings: Settings | None = None,
        *,
        inits: Sequence[Image.Image | None] | None = None,
        callback: Callable[[int, Record], None] | None = None,
        snapshot: Callable[[int, int, int, Image.Image], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Result]:
        """Stylize several content images of the same size with the same styles in one batch.

        Every image keeps its own L-BFGS history, step and early stopping, so
        each result is what ``run`` gives for that image alone (up to float
        rounding); batching changes speed, not pictures. ``callback(i, record)``
        and ``snapshot(i, iteration, scale, image)`` name the image by position.
        Setting ``cancel`` (from another thread) stops the batch with ``Cancelled``
        at the next loss evaluation, so an interrupted run does not wait for it.
        """
        _check_cancel(cancel, "before it started")
        s = settings or Settings()
        started = time.perf_counter()
        b = len(contents)
        inits = list(inits) if inits is not None else [None] * b
        targets = styles if isinstance(styles, StyleTargets) else self.style_targets(styles, s)
        sizes = self._check_sizes(contents, inits, s)

        model = self.features(s)
        dtype = self.dtype(s)
        # Whole image or tiles, and the history length, per level; refuses a budget that cannot work
        # before any work is done.
        memory = [plan_memory(lh, lw, b, 1 if s.preserve_color else 3, s, dtype, self.device) for lw, lh in sizes]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        records: list[list[Record]] = [[] for _ in range(b)]
        stopped: list[list[bool]] = [[] for _ in range(b)]
        iterations = [0] * b
        x: Tensor | None = None
        for level, (lw, lh) in enumerate(sizes, start=1):
            c = torch.cat([images.to_tensor(images.resize(im, (lw, lh)), self.device) for im in contents])  # (b, 3, h, w)
            if s.preserve_color:
                c_target = images.rgb_to_yiq(c)[:, :1]  # (b, 1, h, w) luminance
                grams = [targets.grams(max(lw, lh), (y.mean().item(), y.std().item())) for y in c_target]
                style_grams = {n: torch.cat([g[n] for g in grams]) for n in s.style_layers}  # (b, c, c)
            else:
                c_target = c
                style_grams = targets.grams(max(lw, lh))  # (1, c, c), shared by the batch
            if x is None:
                x = torch.cat([self._initial(s, c_target[i:i + 1], inits[i], (lh, lw)) for i in range(b)])
            else:
                x = _resize_tensor(x, (lh, lw))
            loop = (level, iterations, started, records, callback, snapshot, c, cancel)
            x, early, memory[level - 1] = self._run_level(x, model, s, c_target, style_grams, memory[level - 1], loop)
            for i in range(b):
                stopped[i].append(early[i])
            log.debug("level %d (%dx%d) done at iterations %s", level, lw, lh, iterations)

        out = self._to_rgb(x, c, s)
        seconds = time.perf_counter() - started
        levels = [dict(plan.describe(), size=list(size)) for plan, size in zip(memory, sizes)]
        peak = peak_memory(self.device)
        return [
            Result(image=images.to_image(out[i]), records=records[i], seconds=seconds, device=str(self.device),
                   precision=str(dtype).replace("torch.", ""), sizes=sizes, stopped_early=stopped[i],
                   memory=levels, peak_memory=peak, pixels=out[i].detach().float().cpu())
            for i in range(b)
        ]

    def tile_plan(self, height: int, width: int, batch: int, channels: int, s: Settings) -> TilePlan | None:
        """Tiles for an image of this size under the settings' memory budget, or None for the whole image."""
        plan = plan_memory(height, width, batch, channels, s, self.dtype(s), self.device)
        if plan.tile is None:
            return None
        return plan_tiles(height, width, plan.tile, s.content_layers + s.style_layers, field="tile")

    def _run_level(self, x: Tensor, model: VGG19Features, s: Settings, c_target: Tensor,
                   style_grams: dict[str, Tensor], memory: MemoryPlan, loop: tuple):
        """Optimize one level from ``x``, tiled when ``memory`` says so; returns (x, stopped early, plan used).

        On CUDA out-of-memory the level starts again with smaller tiles (its
        records so far are dropped), down to the smallest core; then the
        out-of-memory error goes to the caller. The output is never shrunk here.
        """
        level, iterations, _started, records = loop[:4]
        start, done, counted = x.detach(), [len(r) for r in records], list(iterations)
        h, w = x.shape[-2:]
        while True:
            tiles = None if memory.tile is None else plan_tiles(h, w, memory.tile, s.content_layers + s.style_layers,
                                                                  field="tile")
            try:
                with torch.no_grad():
                    if tiles is None:
                        content_feats = run_features(model, c_target.expand(-1, 3, -1, -1), s.content_layers,
                                                     self.dtype(s), self.channels_last)
                    else:
                        content_feats = tiled_features(model, c_target, s.content_layers, tiles, self.channels_last)
                objective = Objective(model, s, content_feats, style_grams, self.dtype(s), self.channels_last,
                                      self.fused, tiles=tiles)
                x, early = self._optimize(start.clone().requires_grad_(True), objective, s, *loop,
                                          history=memory.history)
                return x, early, memory
            except torch.OutOfMemoryError:
                smaller = smaller_tile(memory, h, w)
                if smaller is None:
                    raise  # the caller decides: fail, or shrink the output if the settings opt in
                log.warning("out of %s memory at level %d (%dx%d px) with tiles of %s px; retrying with %d px",
                            self.device, level, w, h, memory.tile or "(whole image)", smaller)
                memory = dataclasses.replace(memory, tile=smaller)
                for r, n in zip(records, done):
                    del r[n:]
                iterations[:] = counted
                torch.cuda.empty_cache()

    @staticmethod
    def _check_sizes(contents, inits, s: Settings) -> list[tuple[int, int]]:
        """Level sizes shared by every content image; errors for unusable ones."""
        if s.init not in ("content", "random") and any(init is None for init in inits):
            raise ConfigError(f"init {s.init!r} names an image, but none was given to the engine")
        need = max(min_side(s.content_layers), min_side(s.style_layers))
        deepest = max(s.content_layers + s.style_layers, key=LAYER_INDEX.get)
        sizes = None
        for content in contents:
            if min(content.size) < need:
                raise InputError(
                    f"content image is {content.size[0]}x{content.size[1]} px; the layers up to "
                    f"{deepest} need at least {need} px on each side"
                )
            these = level_sizes(*content.size, s)
            if sizes is not None and these != sizes:
                raise ConfigError(f"a batch needs images of one size; found {these[-1]} and {sizes[-1]}")
            sizes = these
        w, h = sizes[-1]
        if min(w, h) < need:
            raise InputError(
                f"output would be {w}x{h} px; the layers up to {deepest} need at least {need} px on each side; "
                "raise size"
            )
        # The pixel budget needs no check here: Settings refuses size**2 > max_pixels,
        # and w*h never exceeds size**2.
        return sizes

    def _initial(self, s: Settings, content: Tensor, init: Image.Image | None, hw: tuple[int, int]) -> Tensor:
        if s.init == "content":
            return content.clone()
        if s.init == "random":
            gen = torch.Generator().manual_seed(s.seed)
            noise = torch.rand((1, content.shape[1], *hw), generator=gen)  # white noise in 0-1
            return noise.to(self.device)
        x = images.to_tensor(images.resize(init, (hw[1], hw[0])), self.device)
        return images.rgb_to_yiq(x)[:, :1] if content.shape[1] == 1 else x

    @staticmethod
    def _to_rgb(x: Tensor, content_rgb: Tensor, s: Settings) -> Tensor:
        if not s.preserve_color:
            return x
        iq = images.rgb_to_yiq(content_rgb)[:, 1:]
        return images.yiq_to_rgb(torch.cat([x, iq], dim=1))

    def _optimize(self, x, objective, s, level, iterations, started, records, callback, snapshot, content_rgb,
                  cancel, *, history: int = LBFGS_HISTORY):
        """One level for a batch. Returns the final images (b, ...) and which stopped early.

        An image that converges is frozen at that iterate (its records stop)
        while the others go on, exactly as if it had run alone.
        """
        b = x.shape[0]
        parts: dict[str, Tensor] = {}
        active = [True] * b
        frozen: dict[int, Tensor] = {}
        histories: list[list[float]] = [[] for _ in range(b)]

        def evaluate() -> Tensor:
            total, c, st, tv = objective(x)
            parts.update(total=total.detach(), content=c.detach(), style=st.detach(), tv=tv.detach())
            return total

        def record(step_taken: bool) -> None:
            _check_cancel(cancel, f"at iteration {max(iterations)} (scale {level}/{print_scales(s)})")
            # One device sync per evaluation for the whole batch.
            rows = torch.stack([parts["total"], parts["content"], parts["style"], parts["tv"]], 1).tolist()
            now = time.perf_counter() - started
            for i in range(b):
                if not active[i]:
                    continue
                if step_taken:
                    iterations[i] += 1
                total, content, style, tv = rows[i]
                if not all(math.isfinite(v) for v in rows[i]):
                    raise OptimizationError(
                        f"loss became {total} at iteration {iterations[i]} (scale {level}/{print_scales(s)}); "
                        "lower learning_rate or the loss weights"
                    )
                rec = Record(iterations[i], level, total, content, style, tv, now)
                records[i].append(rec)
                histories[i].append(total)
                if callback is not None:
                    callback(i, rec)
                it = iterations[i]
                if snapshot is not None and s.save_every and it % s.save_every == 0 and it > 0:
                    snapshot(i, it, level, images.to_image(self._to_rgb(x[i:i + 1].detach(), content_rgb[i:i + 1], s)))
                if step_taken and _converged(histories[i], s):
                    active[i] = False
                    frozen[i] = x[i].detach().clone()

        def result() -> tuple[Tensor, list[bool]]:
            out = x.detach().clone()
            for i, xi in frozen.items():
                out[i] = xi
            return out, [i in frozen for i in range(b)]

        if s.optimizer == "lbfgs":
            opt = BatchedLBFGS(x, lr=s.step_size(), history=history)
            opt.start(evaluate)
            record(step_taken=False)
            for _ in range(level_iterations(max(x.shape[-2:]), s)):
                if not any(active):
                    break
                opt.step(evaluate)
                record(step_taken=True)
            return result()

        # Adam: an evaluation describes the iterate before its update, so the
        # first evaluation of each step records the previous step's result
        # and a final no-grad pass records the last one.
        adam = torch.optim.Adam([x], lr=s.step_size())
        steps = level_iterations(max(x.shape[-2:]), s)
        for i in range(steps + 1):
            adam.zero_grad(set_to_none=True)
            if i == steps or not any(active):
                with torch.no_grad():
                    evaluate()
                record(step_taken=i > 0)
                return result()
            evaluate().sum().backward()
            record(step_taken=i > 0)
            adam.step()
        return result()


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes so far: CUDA memory allocated since the run began, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return None


def _check_cancel(cancel: threading.Event | None, where: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"stopped {where}: the run was interrupted")


def _converged(history: list[float], s: Settings) -> bool:
    """True when the best loss improved by less than ``tolerance`` over the last window."""
    if s.tolerance <= 0 or len(history) <= s.tolerance_window:
        return False
    before = min(history[: -s.tolerance_window])
    now = min(history)
    return before > 0 and (before - now) / before < s.tolerance


def _resize_tensor(x: Tensor, hw: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    # Antialias when shrinking; bicubic when growing keeps coarse-level strokes crisp.
    return F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True)

