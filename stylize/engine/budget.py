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

Costs of the pass are peak RSS, not live tensors: ``--max-memory`` bounds
the process's RSS, and during a pass the heap keeps freed blocks under the
mmap threshold resident (``stylize.engine.malloc``). They are measured with
``benchmarks/pass_memory.py`` (one evaluation's loss and gradient from a
trimmed heap, RSS sampled every 5 ms, malloc as for a level near its budget;
2026-12-07, after ``fused._Stack`` stopped keeping ReLU outputs and
convolution inputs; issue 13, notes/13.md):

* the whole-image pass: 0.94-0.99 kB per pixel in float32 and 0.69-0.70 kB
  in bfloat16 at 1024 and 1536 px; at 512 px, where malloc keeps blocks up to
  64 MiB on the heap whatever the budget, 1.8 kB and 1.3 kB. Counted as 1900
  and 1350, which cover every size;
* a tile's pass, per pixel of its outer box (as ``estimate`` counts it,
  ``min(h, core + 2 halo) x min(w, core + 2 halo)``) on a 2048x1362 image:
  float32 1188, 957 and 912 B for cores of 512, 768 and 1024 px, bfloat16
  949, 715 and 636 B. Part of it does not grow with the tile (the image's
  gradient, the Grams, the passes' small blocks), so it is counted as a fixed
  TILE_PASS_FIXED plus TILE_PASS_BYTES per pixel: 256 MiB + 850 B in float32
  (1.22x and 1.14x the 512 and 1024 px figures), 256 MiB + 550 B in bfloat16
  (1.20x, 1.16x).

A level far below its budget (``malloc.tight``) keeps blocks up to 64 MiB on
the heap, and its pass's RSS is higher than these figures (up to 2.3x for
float32 tiles of 512 px; ``pass_memory.py --roomy``): ``malloc.TIGHT_SHARE``
is the share of the budget below which that still fits. Rerun pass_memory.py
(both ways) and large.py's part 2 after a change to ``stylize.engine.fused``
or ``tiled``.

Before the stack kept less, the same benchmark measured 1.64 kB and 1.0 kB per
pixel for whole-image passes, and 1.85-1.45 kB (float32) and 1.24-0.89 kB
(bfloat16) for tiles of 512-1024 px; the constants were then 2400/1600 and
3800/2800 per pixel, the tile ones set from runs of pass_memory.py that had
measured malloc's roomy setting by mistake (it tuned malloc after the level
started). With them a 4096x4096 float32 level under 6 GiB ran in tiles of 512
px, 1.72x its pixels, and missed the 2x time target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stylize.engine.features import LAYER_INDEX, CONV_NAMES, LAYERS
from stylize.engine.hardware import available_memory
from stylize.engine.settings import Settings
from stylize.engine.tiled import halo_for, layer_geometry
from stylize.errors import ResourceError

#: Bytes of one VGG pass and its backward, by dtype (see the module docstring): per pixel of the whole
#: image, and a tile's fixed part plus per pixel of its outer box.
WHOLE_PASS_BYTES = {torch.float32: 1900, torch.bfloat16: 1350}
TILE_PASS_FIXED = 256 * 2**20
TILE_PASS_BYTES = {torch.float32: 850, torch.bfloat16: 550}
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
        tile_pass = TILE_PASS_FIXED + TILE_PASS_BYTES.get(dtype, TILE_PASS_BYTES[torch.float32]) * outer
        pass_bytes = max(tile_pass, anchor_pass)
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
