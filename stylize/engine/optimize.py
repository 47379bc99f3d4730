"""The Gatys et al. optimization: an image is optimized so that its VGG19
features match the content photo's and its Gram matrices match the painting's.

``Engine`` holds the network on one device (loaded once) and runs jobs;
``StyleTargets`` holds a style's Gram matrices per size, computed once and
reused across many content images. A run goes level by level (``schedule.py``);
each level is a ``Level``, which optimizes the batch with ``BatchedLBFGS``
(``lbfgs.py``) or Adam and reports one ``Record`` per loss evaluation to a
callback. The records come back with the ``Result``; nothing here prints.

The optimized variable is the RGB image in 0-1 (or its luminance, with
``preserve_color``), whatever the weight set: each weight set applies its own
preprocessing inside the network, so learning rates, noise and total
variation mean the same for all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from stylize.engine import images
from stylize.engine.budget import MemoryPlan, plan_memory, smaller_tile
from stylize.engine.features import LAYER_INDEX, VGG19Features, min_side, resolve_weights
from stylize.engine.hardware import peak_memory, resolve_device, resolve_precision
from stylize.engine.layout import Layout
from stylize.engine.lbfgs import BatchedLBFGS
from stylize.engine.losses import Valid, gram
from stylize.engine.malloc import (RELEASE_EACH_STEP_PIXELS, release_freed_memory, retain_freed_memory, start_level,
                                   tight)
from stylize.engine.objective import Anchor, Objective, run_features
from stylize.engine.schedule import (anchor_level, converged, level_iterations, level_settings, level_sizes,
                                     print_scales)
from stylize.engine.settings import Settings
from stylize.engine.tiled import TilePlan, plan_tiles, tiled_features, tiled_grams
from stylize.errors import Cancelled, ConfigError, InputError, OptimizationError

log = logging.getLogger(__name__)


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
    batch: int = 1  # images that shared the run's VGG passes, this one included
    # (w, h) per level of the batch's tensor: the largest width and height of its images (``layout.py``);
    # the image's own sizes when they all had one shape.
    padded_sizes: list[tuple[int, int]] = field(default_factory=list)


RecordCallback = Callable[[Record], None]
SnapshotCallback = Callable[[int, int, Image.Image], None]  # (iteration, scale, image)


@dataclass
class Reporting:
    """Where a batch run reports, shared by its levels: each record goes to ``callback(i, record)``,
    every ``save_every`` iterations image i goes to ``snapshot(i, iteration, scale, image)``, and
    setting ``cancel`` stops the run at the next loss evaluation."""

    started: float  # perf_counter when the run started
    levels: int  # of the whole run, for messages
    callback: Callable[[int, Record], None] | None = None
    snapshot: Callable[[int, int, int, Image.Image], None] | None = None
    cancel: threading.Event | None = None

    def check_cancel(self, where: str) -> None:
        """Raise ``Cancelled`` if the run was interrupted."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"stopped {where}: the run was interrupted")


@dataclass
class Level:
    """One level of a batch being optimized: the iterate, and per image its records, its iteration
    count and whether it stopped early.

    An image that converges is frozen at that iterate (its records stop) while the others go on,
    exactly as if it had run alone. A level is all its own state: one that runs out of memory is
    dropped whole and started again as a fresh ``Level``, and the run takes its records and counts
    only once it is done (``Batch.add``).
    """

    index: int  # 1 = coarsest
    x: Tensor  # (b, c, h, w) the iterate, requiring grad
    objective: Objective
    settings: Settings
    report: Reporting
    to_rgb: Callable[[int, Tensor], Tensor]  # (image i, the batch's iterate) -> image i in RGB, for snapshots
    iterations: list[int]  # per image: iterations of the whole run, this level's included
    records: list[list[Record]] = field(default_factory=list)  # per image: this level's
    frozen: dict[int, Tensor] = field(default_factory=dict)  # image -> the iterate it converged at
    parts: dict[str, Tensor] = field(default_factory=dict)  # the last evaluation's losses, each (b,)
    # Hand the heap's free pages back after every evaluation (CPU levels of RELEASE_EACH_STEP_PIXELS or
    # more): otherwise the holes its blocks leave become resident one by one (``stylize.engine.malloc``).
    release_each_step: bool = False

    def __post_init__(self):
        self.iterations = list(self.iterations)  # the run's counts are not touched until the level is done
        self.records = [[] for _ in self.iterations]

    @property
    def stopped(self) -> list[bool]:
        """Per image: whether it converged before the level's last iteration."""
        return [i in self.frozen for i in range(len(self.iterations))]

    def run(self, history: int, history_dtype: torch.dtype = torch.float32) -> None:
        """Optimize the level: its iterations, or until every image has converged."""
        steps = level_iterations(max(self.x.shape[-2:]), self.settings)
        if self.settings.optimizer == "lbfgs":
            self._lbfgs(steps, history, history_dtype)
        else:
            self._adam(steps)

    def result(self) -> Tensor:
        """(b, c, h, w) the final images, each at its last iterate or where it converged."""
        out = self.x.detach().clone()
        for i, xi in self.frozen.items():
            out[i] = xi
        return out

    def evaluate(self) -> Tensor:
        """The per-image total loss (b,) at ``x``; keeps its parts for ``record``."""
        total, c, st, tv = self.objective(self.x)
        self.parts.update(total=total.detach(), content=c.detach(), style=st.detach(), tv=tv.detach())
        return total

    def record(self, step_taken: bool) -> None:
        """Report the last evaluation of every image still going, and freeze those that converged."""
        self.report.check_cancel(f"at iteration {max(self.iterations)} (scale {self.index}/{self.report.levels})")
        p = self.parts
        # One device sync per evaluation for the whole batch.
        rows = torch.stack([p["total"], p["content"], p["style"], p["tv"]], 1).tolist()
        now = time.perf_counter() - self.report.started
        for i, row in enumerate(rows):
            if i not in self.frozen:
                self._record_one(i, row, now, step_taken)
        if self.release_each_step:
            release_freed_memory()

    def _record_one(self, i: int, row: list[float], now: float, step_taken: bool) -> None:
        s, report = self.settings, self.report
        if step_taken:
            self.iterations[i] += 1
        it = self.iterations[i]
        if not all(math.isfinite(v) for v in row):
            raise OptimizationError(
                f"loss became {row[0]} at iteration {it} (scale {self.index}/{report.levels}); "
                "lower learning_rate or the loss weights"
            )
        rec = Record(it, self.index, *row, now)
        self.records[i].append(rec)
        if report.callback is not None:
            report.callback(i, rec)
        if report.snapshot is not None and s.save_every and it % s.save_every == 0 and it > 0:
            report.snapshot(i, it, self.index, images.to_image(self.to_rgb(i, self.x.detach())))
        if step_taken and converged([r.total for r in self.records[i]], s):
            self.frozen[i] = self.x[i].detach().clone()

    def _lbfgs(self, steps: int, history: int, history_dtype: torch.dtype) -> None:
        opt = BatchedLBFGS(self.x, lr=self.settings.step_size(), history=history, history_dtype=history_dtype)
        opt.start(self.evaluate)
        self.record(step_taken=False)
        for _ in range(steps):
            if len(self.frozen) == len(self.iterations):
                break
            opt.step(self.evaluate)
            self.record(step_taken=True)

    def _adam(self, steps: int) -> None:
        # An evaluation describes the iterate before its update, so the first evaluation of each step
        # records the previous step's result and a final no-grad pass records the last one.
        adam = torch.optim.Adam([self.x], lr=self.settings.step_size())
        for i in range(steps + 1):
            adam.zero_grad(set_to_none=True)
            if i == steps or len(self.frozen) == len(self.iterations):
                with torch.no_grad():
                    self.evaluate()
                self.record(step_taken=i > 0)
                return
            self.evaluate().sum().backward()
            self.record(step_taken=i > 0)
            adam.step()


@dataclass
class Batch:
    """What a batch run has done so far, per image: its records, its iteration count, and per level
    whether it stopped early."""

    size: int
    records: list[list[Record]] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    stopped: list[list[bool]] = field(default_factory=list)

    def __post_init__(self):
        self.records = [[] for _ in range(self.size)]
        self.iterations = [0] * self.size
        self.stopped = [[] for _ in range(self.size)]

    def add(self, level: Level) -> None:
        """Take a finished level's records and counts."""
        for i in range(self.size):
            self.records[i] += level.records[i]
            self.stopped[i].append(level.stopped[i])
        self.iterations = list(level.iterations)


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
        """Stylize several content images with the same styles in one batch.

        Every image keeps its own L-BFGS history, step and early stopping, so
        each result is what ``run`` gives for that image alone (up to float
        rounding); batching changes speed, not pictures. Photos of different
        shapes share the batch padded, level by level, to the largest height
        and width (``layout.py``): each keeps the sizes it has alone, its losses
        count its own pixels only, and its output is cropped back to its size.
        A batch of mixed shapes is never tiled: when a level of it needs tiles
        under the memory budget its images run one by one instead, and when it
        runs out of device memory the error goes to the caller, which can run
        them one by one (``flows.catalog`` does).

        ``callback(i, record)`` and ``snapshot(i, iteration, scale, image)``
        name the image by position. Setting ``cancel`` (from another thread)
        stops the batch with ``Cancelled`` at the next loss evaluation, so an
        interrupted run does not wait for it.
        """
        s = settings or Settings()
        report = Reporting(time.perf_counter(), print_scales(s), callback, snapshot, cancel)
        report.check_cancel("before it started")
        inits = list(inits) if inits is not None else [None] * len(contents)
        targets = styles if isinstance(styles, StyleTargets) else self.style_targets(styles, s)
        layout = self._check_sizes(contents, inits, s)
        # Whole image or tiles, and the history length, per level; refuses a budget that cannot work
        # before any work is done.
        preview = anchor_level([max(layout.padded(k)) for k in range(layout.levels)], s)
        own = [level_settings(s, k, preview) for k in range(layout.levels)]  # each level's own terms
        plans = [self._plan(layout, k, preview, own[k]) for k in range(layout.levels)]
        if layout.mixed and any(plan.tile is not None for plan in plans):
            log.info("a batch of %d images of mixed shapes needs tiles: running them one by one", len(contents))
            return self._one_by_one(contents, targets, s, inits, report)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        batch = Batch(len(contents))
        x: Tensor | None = None
        anchor_at = self._anchors(contents, targets, layout, preview, plans, s)
        for k in range(layout.levels):
            c, c_target, style_grams = self._level_targets(contents, targets, layout, k, s)
            x = self._level_start(x, c_target, inits, layout, k, s)
            new_level = functools.partial(
                Level, index=k + 1, settings=s, report=report, iterations=batch.iterations,
                to_rgb=lambda i, xs, c=c, k=k: self._to_rgb(layout.crop(xs, i, k), layout.crop(c, i, k), s))
            level, plans[k] = self._run_level(x.detach(), own[k], c_target, style_grams, plans[k], layout.valid(k),
                                              new_level, anchor_at(k))
            batch.add(level)
            x = level.result()
            log.debug("level %d (%dx%d padded) done at iterations %s", k + 1, *layout.padded(k), batch.iterations)
        return self._results(self._to_rgb(x, c, s), layout, plans, own, batch, report, s)

    def _plan(self, layout: Layout, k: int, preview: int | None, s: Settings) -> MemoryPlan:
        """Level ``k``'s memory plan; above a print's ``preview`` level it also holds the preview's terms."""
        w, h = layout.padded(k)
        channels, batch = 1 if s.preserve_color else 3, len(layout.sizes)
        if preview is None or k <= preview:
            return plan_memory(h, w, batch, channels, s, self.dtype(s), self.device)
        pw, ph = layout.padded(preview)
        plan = plan_memory(h, w, batch, channels, s, self.dtype(s), self.device, anchor_pixels=pw * ph * batch)
        return dataclasses.replace(plan, anchor=(pw, ph))

    def _one_by_one(self, contents: Sequence[Image.Image], targets: StyleTargets, s: Settings,
                    inits: list[Image.Image | None], report: Reporting) -> list[Result]:
        """Each image in a batch of its own, reported under its position in the batch."""
        results = []
        for i, (content, init) in enumerate(zip(contents, inits)):
            callback = None if report.callback is None else (lambda _, rec, i=i: report.callback(i, rec))
            snapshot = None if report.snapshot is None else (
                lambda _, it, scale, image, i=i: report.snapshot(i, it, scale, image))
            results += self.run_batch([content], targets, s, inits=[init], callback=callback, snapshot=snapshot,
                                      cancel=report.cancel)
        return results

    def _results(self, rgb: Tensor, layout: Layout, plans: list[MemoryPlan], own: list[Settings], batch: Batch,
                 report: Reporting, s: Settings) -> list[Result]:
        """A Result per image from the last level's RGB batch ``rgb`` (b, 3, H, W), cropped to each image;
        ``own``: the settings of each level's own terms (``schedule.level_settings``)."""
        seconds = time.perf_counter() - report.started
        peak = peak_memory(self.device)
        last = layout.levels - 1
        padded = [layout.padded(k) for k in range(layout.levels)]
        results = []
        for i in range(batch.size):
            out = layout.crop(rgb, i, last)[0]  # (3, h_i, w_i)
            levels = [dict(plan.describe(), size=list(size), style_layers=list(o.style_layers))
                      for plan, size, o in zip(plans, layout.sizes[i], own)]
            results.append(Result(
                image=images.to_image(out), records=batch.records[i], seconds=seconds, device=str(self.device),
                precision=str(self.dtype(s)).replace("torch.", ""), sizes=list(layout.sizes[i]),
                stopped_early=batch.stopped[i], memory=levels, peak_memory=peak,
                pixels=out.detach().float().cpu().contiguous(), batch=batch.size, padded_sizes=padded))
        return results

    def _level_targets(self, contents: Sequence[Image.Image], targets: StyleTargets, layout: Layout, k: int,
                       s: Settings) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """At level ``k``, padded as ``layout`` says: the content photos (b, 3, H, W), what the content
        loss matches (the photos, or their luminance (b, 1, H, W) with ``preserve_color``), and the
        style Grams."""
        c = layout.pad([images.to_tensor(images.resize(im, size), self.device)
                        for im, size in zip(contents, layout.level(k))], k)  # (b, 3, H, W)
        longest = max(layout.padded(k))  # every image's longest side at this level
        if not s.preserve_color:
            return c, c, targets.grams(longest)  # (1, c, c) per layer, shared by the batch
        c_target = images.rgb_to_yiq(c)[:, :1]  # (b, 1, H, W) luminance; zero in the padding
        moments = [layout.crop(c_target, i, k) for i in range(len(contents))]
        grams = [targets.grams(longest, (y.mean().item(), y.std().item())) for y in moments]
        return c, c_target, {n: torch.cat([g[n] for g in grams]) for n in s.style_layers}  # (b, c, c)

    def _level_start(self, previous: Tensor | None, c_target: Tensor, inits: list[Image.Image | None],
                     layout: Layout, k: int, s: Settings) -> Tensor:
        """The batch's starting images at level ``k``: the initial images at the coarsest level, else the
        previous level's result resized to each image's size here."""
        sizes = [(h, w) for w, h in layout.level(k)]
        if previous is None:
            return layout.pad([self._initial(s, layout.crop(c_target, i, k), init, hw)
                               for i, (init, hw) in enumerate(zip(inits, sizes))], k)
        if not layout.mixed:
            return _resize_tensor(previous, sizes[0])
        return layout.pad([_resize_tensor(layout.crop(previous, i, k - 1), hw) for i, hw in enumerate(sizes)], k)

    def tile_plan(self, height: int, width: int, batch: int, channels: int, s: Settings) -> TilePlan | None:
        """Tiles for an image of this size under the settings' memory budget, or None for the whole image."""
        plan = plan_memory(height, width, batch, channels, s, self.dtype(s), self.device)
        if plan.tile is None:
            return None
        return plan_tiles(height, width, plan.tile, s.content_layers + s.style_layers, field="tile")

    def _anchors(self, contents: Sequence[Image.Image], targets: StyleTargets, layout: Layout, preview: int | None,
                 plans: list[MemoryPlan], s: Settings) -> Callable[[int], Anchor | None]:
        """Level k -> what it matches of its print's preview (``objective.Anchor``), or None. The preview's
        objective is built once, when the first level above it starts (its plan is final by then)."""
        objective = functools.cache(lambda: self._preview_objective(contents, targets, layout, preview,
                                                                    plans[preview], s))
        return lambda k: (None if preview is None or k <= preview
                          else Anchor(objective(), functools.partial(layout.shrink, k=k, j=preview)))

    def _preview_objective(self, contents: Sequence[Image.Image], targets: StyleTargets, layout: Layout,
                           preview: int, plan: MemoryPlan, s: Settings) -> Objective:
        """The objective of a print's preview level ``preview``, which the levels above it also match on
        their image shrunk to that level (``objective.Anchor``)."""
        _c, c_target, grams = self._level_targets(contents, targets, layout, preview, s)
        w, h = layout.padded(preview)
        tiles = None if plan.tile is None else plan_tiles(h, w, plan.tile, s.content_layers + s.style_layers,
                                                          field="tile")
        return self._objective(c_target, grams, tiles, layout.valid(preview), s)

    def _objective(self, c_target: Tensor, style_grams: dict[str, Tensor], tiles: TilePlan | None,
                   valid: Valid | None, s: Settings, anchor: Anchor | None = None) -> Objective:
        """The objective of a level whose content targets come from ``c_target``."""
        model, dtype = self.features(s), self.dtype(s)
        with torch.no_grad():
            if tiles is None:
                content_feats = run_features(model, c_target.expand(-1, 3, -1, -1), s.content_layers,
                                             dtype, self.channels_last, valid)
            else:
                content_feats = tiled_features(model, c_target, s.content_layers, tiles, self.channels_last)
        return Objective(model, s, content_feats, style_grams, dtype, self.channels_last, self.fused,
                         tiles=tiles, valid=valid, anchor=anchor)

    def _run_level(self, start: Tensor, s: Settings, c_target: Tensor, style_grams: dict[str, Tensor],
                   plan: MemoryPlan, valid: Valid | None, new_level: Callable[..., Level],
                   anchor: Anchor | None = None) -> tuple[Level, MemoryPlan]:
        """Optimize one level from ``start``, tiled when ``plan`` says so; returns the finished level and
        the plan it used. ``valid``: where each image is in a padded batch of mixed shapes; ``anchor``:
        a print's top level also matches its preview (``objective.Anchor``).

        On CUDA out-of-memory the level starts again with smaller tiles (its
        records so far are dropped), down to the smallest core; then, or at once
        for a padded batch (never tiled), the out-of-memory error goes to the
        caller. The output is never shrunk here.
        """
        h, w = start.shape[-2:]
        while True:
            tiles = None if plan.tile is None else plan_tiles(h, w, plan.tile, s.content_layers + s.style_layers,
                                                              field="tile")
            try:
                if self.device.type == "cpu":  # a print's levels map their blocks on their own (malloc.start_level)
                    start_level(h * w * start.shape[0], tight(plan.estimate, plan.budget))
                objective = self._objective(c_target, style_grams, tiles, valid, s, anchor)
                if self.device.type == "cpu":  # the levels before and the target passes leave free pages behind
                    release_freed_memory()
                level = new_level(x=start.clone().requires_grad_(True), objective=objective,
                                  release_each_step=self.device.type == "cpu" and h * w >= RELEASE_EACH_STEP_PIXELS)
                level.run(plan.history, plan.history_dtype)
                return level, plan
            except torch.OutOfMemoryError:
                smaller = None if valid is not None else smaller_tile(plan, h, w)
                if smaller is None:
                    raise  # the caller decides: fail, or shrink the output if the settings opt in
                log.warning("out of %s memory at level %d (%dx%d px) with tiles of %s px; retrying with %d px",
                            self.device, new_level.keywords["index"], w, h, plan.tile or "(whole image)", smaller)
                plan = dataclasses.replace(plan, tile=smaller)
                torch.cuda.empty_cache()

    @staticmethod
    def _check_sizes(contents, inits, s: Settings) -> Layout:
        """Each content image's level sizes; errors for unusable images."""
        if s.init not in ("content", "random") and any(init is None for init in inits):
            raise ConfigError(f"init {s.init!r} names an image, but none was given to the engine")
        need = max(min_side(s.content_layers), min_side(s.style_layers))
        deepest = max(s.content_layers + s.style_layers, key=LAYER_INDEX.get)
        sizes = []
        for content in contents:
            if min(content.size) < need:
                raise InputError(
                    f"content image is {content.size[0]}x{content.size[1]} px; the layers up to "
                    f"{deepest} need at least {need} px on each side"
                )
            sizes.append(tuple(level_sizes(*content.size, s)))
            w, h = sizes[-1][-1]
            if min(w, h) < need:
                raise InputError(
                    f"output would be {w}x{h} px; the layers up to {deepest} need at least {need} px on each "
                    "side; raise size"
                )
        # The pixel budget needs no check here: Settings refuses size**2 > max_pixels,
        # and w*h never exceeds size**2.
        return Layout(tuple(sizes))

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


def _resize_tensor(x: Tensor, hw: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    # Antialias when shrinking; bicubic when growing keeps coarse-level strokes crisp.
    return F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True)

