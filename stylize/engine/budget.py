"""How a level fits a memory budget: the whole image at once, or tiles, and how long an L-BFGS history.

The estimate adds what a level holds at its peak:

* the runtime and the network's weights (fixed);
* image-sized vectors (IMAGE_VECTORS float32 ones): at most 7 are alive at
  once in a tiled level (``tests/test_budget.py`` counts them op by op): the
  photo, the level's start and its iterate, L-BFGS's last gradient and its
  step, the new gradient (the tiled objective adds every tile's part, TV's
  too, into one buffer that becomes it) and one of TV's neighbour
  differences; the other 3 are headroom. Before TV's gradient was computed
  in place and L-BFGS stopped copying gradients, 13 were; plus the content
  targets (relu4_2: 512 channels at 1/64 of the pixels, 32 bytes per pixel);
* the L-BFGS history: two vectors per remembered step, 2 x 50 x 3 floats =
  1.2 kB per pixel at the default 50 (200 MB per vector at 4096 x 4096);
* one VGG pass with its backward: over the whole image, or over one tile's
  core plus halo (``stylize.engine.tiled``; tiles run one after another);
* on a print's levels above its preview, the preview's terms on the image
  shrunk to the preview's size (``objective.Anchor``): a whole pass at that
  size (beside the level's own whole pass; after a tiled level's tiles, so
  the larger of the two), its content targets, and one more image-sized
  vector (the gradient of the shrinking).

Per-pixel costs of the pass are peak RSS, not live tensors: ``--max-memory``
bounds the process's RSS, and during a pass the heap keeps freed blocks under
the mmap threshold resident (``stylize.engine.malloc``). float32 was measured
with ``/usr/bin/time``-style peak RSS (``benchmarks/large.py``): the fused
whole-image pass about 2.1 kB per pixel at 512 px, a tile's autograd pass
about 3.5 kB per pixel of its outer box; the tile pass on the fused backward,
with ``benchmarks/pass_memory.py`` on a 2048x1362 image (2026-12-07, load
5-7): 3.5 kB of RSS (1.7 kB live) per outer pixel for tiles of 512 px, 2.5 kB
for 768, 1.7 kB for 1024, so 3800 still bounds it. bfloat16 (the CPU's default) with
``benchmarks/pass_memory.py`` (one evaluation's loss and gradient from a
trimmed heap, RSS sampled every 5 ms; issue 13, notes/13-bf16.md):

* the fused whole-image pass holds 1.0 kB per pixel of live tensors at 512,
  1024 and 1536 px, and 1.14-1.56 kB of RSS (the most at 512-1024 px, where
  more of its blocks are under the mmap threshold); counted as 1600;
* a tile's pass (on the fused pass's backward) holds 0.84-1.07 kB per pixel
  of the outer box (as ``estimate`` counts it) live, 1.14-2.21 kB of RSS
  (tiles of 1024 down to 512 px on a 2048x1362 image); counted as 2800. The
  autograd tile pass before it held 1.7-1.9 kB live, 2.1-3.3 kB of RSS, and
  2300 was a guess: a 4096 px print under 6 GiB peaked at 10.9 GB (178%), a
  2048 px print's top level under 3 GiB (tiles of 768, 5 bfloat16 pairs, 5
  steps) at 4127 MiB RSS for an estimate of 3015. Besides the pass, that
  level held holes of 4-64 MiB blocks (now mapped on their own:
  ``malloc.start_level``) and a copy of the bfloat16 history in L-BFGS's
  products (now read in place).
  ``stylize.engine.tiled``'s pass changes its cost: rerun pass_memory.py's
  tile rows and large.py's bf16 row after a change there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stylize.engine.features import LAYER_INDEX, CONV_NAMES, LAYERS
from stylize.engine.hardware import available_memory
from stylize.engine.settings import Settings
from stylize.engine.tiled import halo_for, layer_geometry
from stylize.errors import ResourceError

#: Bytes per pixel of one VGG pass and its backward, by dtype: the whole image (fused pass) and a tile's
#: outer box (autograd pass).
WHOLE_PASS_BYTES = {torch.float32: 2400, torch.bfloat16: 1600}
TILE_PASS_BYTES = {torch.float32: 3800, torch.bfloat16: 2800}
#: Image-sized float32 vectors a level holds at once besides the history (see the module docstring;
#: tests/test_budget.py counts them), and what the estimate counts: those plus 3 of headroom.
IMAGE_VECTORS_HELD = 7
IMAGE_VECTORS = IMAGE_VECTORS_HELD + 3
#: The Python process with torch loaded, on the CPU, before any tensor (peak RSS of an idle engine: 0.7 GB
#: including the weights, which are counted separately).
CPU_RUNTIME_BYTES = 500 * 2**20
#: History lengths tried, longest first: 50 is the engine's default; 5 still gives L-BFGS its curvature.
HISTORIES = (50, 20, 10, 5)
#: How the history is stored, tried in order at each length: bfloat16 halves it (a print's top level, where
#: 2 x 5 float32 vectors at 4096 x 4096 are 2 GB) before the history is shortened or the tiles shrink.
HISTORY_DTYPES = (torch.float32, torch.bfloat16)
#: Tile cores tried, largest first. Below 128 px the 80 px halo makes a tile mostly halo.
CORES = (2048, 1536, 1024, 768, 640, 512, 384, 256, 192, 128)


@dataclass(frozen=True)
class MemoryPlan:
    """What a level runs as: ``tile`` is the core size (None: the whole image at once)."""

    tile: int | None
    halo: int
    history: int
    estimate: int  # bytes at the peak
    budget: int | None  # bytes; None when unknown (no limit applied)
    history_dtype: torch.dtype = torch.float32  # bfloat16 when float32 pairs of this length do not fit
    anchor: tuple[int, int] | None = None  # (w, h) of the preview this level also matches (objective.Anchor)

    def describe(self) -> dict:
        """For metadata: what was used and why."""
        return {"tile": self.tile, "halo": self.halo if self.tile else 0, "history": self.history,
                "history_dtype": str(self.history_dtype).replace("torch.", ""),
                "estimate_bytes": self.estimate, "budget_bytes": self.budget,
                "anchor": None if self.anchor is None else list(self.anchor)}


def weight_bytes(settings: Settings, dtype: torch.dtype) -> int:
    """Bytes of the convolution weights up to the deepest layer used."""
    deepest = max(LAYER_INDEX[n] for n in settings.content_layers + settings.style_layers)
    convs = sum(1 for name, kind in LAYERS[: deepest + 1] if kind == "conv")
    channels = [3, 64, 64, 128, 128] + [256] * 4 + [512] * 8
    params = sum(channels[i] * channels[i + 1] * 9 + channels[i + 1] for i in range(min(convs, len(CONV_NAMES))))
    return params * torch.empty((), dtype=dtype).element_size()


def device_budget(device: torch.device) -> int | None:
    """The default budget: 90% of the device's free memory (CUDA) or of the available RAM (CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(0.9 * free)
    if device.type == "cpu":
        free = available_memory()
        return None if free is None else int(0.9 * free)
    return None


def estimate(height: int, width: int, batch: int, channels: int, settings: Settings, dtype: torch.dtype,
             device: torch.device, tile: int | None, history: int,
             history_dtype: torch.dtype = torch.float32, anchor_pixels: int = 0) -> int:
    """Peak bytes of one level of ``batch`` images of ``height`` x ``width`` (see the module docstring);
    ``anchor_pixels``: the preview's pixels (all images) when the level also matches its preview."""
    pixels = height * width * batch
    content = sum(_channels(n) * 4 / layer_geometry(n)[1] ** 2 for n in settings.content_layers)  # targets
    pair = 2 * channels * history_dtype.itemsize  # one (s, y) pair per pixel
    per_pixel = IMAGE_VECTORS * channels * 4 + content + history * pair
    whole = WHOLE_PASS_BYTES.get(dtype, WHOLE_PASS_BYTES[torch.float32])
    anchor_pass = whole * anchor_pixels
    if tile is None:  # the level's pass and the anchor's keep what their backward needs until it runs
        pass_bytes = whole * pixels + anchor_pass
    else:  # the tiles' passes are over (their gradient taken) before the anchor's pass runs
        halo, _ = halo_for(settings.content_layers + settings.style_layers)
        outer = (min(height, tile + 2 * halo) * min(width, tile + 2 * halo)) * batch
        pass_bytes = max(TILE_PASS_BYTES.get(dtype, TILE_PASS_BYTES[torch.float32]) * outer, anchor_pass)
    # The anchor's content targets, and its gradient enlarged back to the image before it is added.
    anchor = content * anchor_pixels + channels * 4 * pixels if anchor_pixels else 0
    fixed = weight_bytes(settings, dtype) + (CPU_RUNTIME_BYTES if device.type == "cpu" else 0)
    return int(fixed + per_pixel * pixels + pass_bytes + anchor)


def _channels(layer: str) -> int:
    """Channels of a VGG19 layer's output."""
    return (64, 128, 256, 512, 512)[int(layer[4]) - 1]  # conv4_2, relu4_2, pool4: block 4


def plan_memory(height: int, width: int, batch: int, channels: int, settings: Settings, dtype: torch.dtype,
                device: torch.device, anchor_pixels: int = 0) -> MemoryPlan:
    """The whole image with the longest history that fits, else tiles; ResourceError when nothing fits.

    ``settings.tile`` forces tiles of that core; ``settings.max_memory``
    (else the device's free memory) is the budget. The history is
    shortened before the tiles shrink: tiles change the cost, not the
    picture, while the history changes how fast L-BFGS converges.
    """
    budget = settings.memory_budget()
    if budget is None:
        budget = device_budget(device)
    halo, _ = halo_for(settings.content_layers + settings.style_layers)
    longest = max(height, width)
    if settings.tile is not None:
        cores: tuple[int | None, ...] = (settings.tile,)
    else:
        cores = (None,) + tuple(c for c in CORES if c < longest)
    for core in cores:
        for history in HISTORIES:
            for kind in HISTORY_DTYPES:
                need = estimate(height, width, batch, channels, settings, dtype, device, core, history, kind,
                                anchor_pixels)
                if budget is None or need <= budget:
                    return MemoryPlan(core, halo, history, need, budget, kind)
            if core is None and history == HISTORIES[1]:
                break  # the whole image only with a useful history; otherwise tiles
    smallest = cores[-1]
    need = estimate(height, width, batch, channels, settings, dtype, device, smallest, HISTORIES[-1],
                    HISTORY_DTYPES[-1], anchor_pixels)
    field = "max_memory" if settings.max_memory is not None else "max_memory (unset: the device's free memory)"
    what = f"a {smallest} px tile" if smallest else "the whole image"
    raise ResourceError(
        f"{field}: a {width}x{height} px output needs at least {_gib(need)} ({what}, a {HISTORIES[-1]}-step "
        f"bfloat16 L-BFGS history), found a budget of {_gib(budget)}; raise max_memory to {_gib(need)} or more"
        + (", or lower tile" if settings.tile else "") + ", or lower size")


def smaller_tile(plan: MemoryPlan, height: int, width: int) -> int | None:
    """The next tile core below the plan's (the largest below the image for a whole-image plan), or None."""
    below = plan.tile if plan.tile is not None else max(height, width)
    return next((c for c in CORES if c < below), None)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
