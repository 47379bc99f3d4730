"""The level schedule: how many levels, the size of each, its iterations, and when a level stops early.

A run optimizes coarse to fine; each level is half the size of the next and
starts from the previous level's result, upscaled. Arithmetic on sizes and
loss histories only: ``stylize plan``, the catalog's batching and the engine
read the same schedule.
"""

from __future__ import annotations

import math

from stylize.engine import images
from stylize.engine.settings import Settings
from stylize.engine.tiled import layer_geometry

#: Coarse levels below this longest side carry too little structure to help.
MIN_LEVEL_SIZE = 64
#: Prints: above PRINT_FROM px the schedule is the preview's own (``scales`` levels up to PRINT_BASE px, the
#: same iterations) followed by one level per doubling up to the size, each with fewer iterations
#: (``level_iterations``). The print's levels up to PRINT_BASE are then exactly the PRINT_BASE px run
#: (same sizes, Grams, iterations), so the print is its preview refined, and costs a small multiple of it.
#: Up to PRINT_FROM px the schedule is ``scales`` and ``iterations`` as given.
PRINT_FROM = 1024
PRINT_BASE = 512
PRINT_MIN_ITERATIONS = 5


def print_scales(settings: Settings) -> int:
    """Levels for ``settings.size``: ``scales``, plus above PRINT_FROM one per doubling over PRINT_BASE."""
    if settings.size <= PRINT_FROM:
        return settings.scales
    return settings.scales + math.ceil(math.log2(settings.size / PRINT_BASE))


def level_iterations(longest: int, settings: Settings) -> int:
    """Iterations of a level whose longest side is ``longest``: ``iterations``, fewer for a print's top levels.

    In a print (size above PRINT_FROM) a level above PRINT_BASE gets
    ``iterations * (PRINT_BASE / longest) ** 2`` (at least PRINT_MIN_ITERATIONS),
    so each costs about what the PRINT_BASE level does: the composition comes
    from the preview's levels, the top levels add brush detail. Measured on
    the 2-core machine (benchmarks/large.py part 3): a schedule that spent
    full iterations up to 1024 px and started at 512 px without the preview's
    coarse level cost 21x its preview and drifted 16% (content) / 28% (style)
    from it.
    """
    if settings.size <= PRINT_FROM or longest <= PRINT_BASE or settings.iterations == 0:
        return settings.iterations
    return max(min(PRINT_MIN_ITERATIONS, settings.iterations), round(settings.iterations * (PRINT_BASE / longest) ** 2))


def anchor_level(longest_sides: list[int], settings: Settings) -> int | None:
    """In a print, the index of its preview's top level (the last of longest side PRINT_BASE or less); the
    levels above it also match the preview's objective on their image shrunk to that level's size (see
    ``objective.Anchor``). None when the run is not a print or has no level above PRINT_BASE."""
    if settings.size <= PRINT_FROM or settings.iterations == 0:
        return None
    below = [k for k, n in enumerate(longest_sides) if n <= PRINT_BASE]
    if not below or below[-1] == len(longest_sides) - 1:
        return None
    return below[-1]


#: The first level above a print's preview matches, at its own size, only the style layers of this stride
#: or finer (VGG's blocks 1-3: relu1_1, relu2_1, relu3_1 by default); see ``level_settings``.
FINE_STRIDE = 4


def level_settings(settings: Settings, k: int, preview: int | None) -> Settings:
    """What level ``k``'s own terms use: ``settings``, except on the first level above a print's ``preview``
    level, whose own style terms keep only the fine layers (stride FINE_STRIDE or less), each at the weight
    it has in ``settings``.

    At twice the preview's size, that level's deep layers (relu4_1, relu5_1) see the bands of the picture
    that the preview's relu3_1 and relu4_1 see in the anchor (``objective.Anchor``), and pull them their own
    way: they re-compose the picture where the print should only add detail. Measured on the default 2048 px
    print, shrunk to 512 px and judged against its preview (``Engine.judge``, as benchmarks/large.py part 3
    does), the print's style loss went from 1.22x the preview's (relu4_1 1.22x) to 1.00x (relu4_1 0.99x),
    content 1.02x to 1.04x; large.py part 3 with this rule: style 0.98x and 1.01x, content 1.04x (two runs,
    2026-12-07). Dropping them on every level above the preview also gave 0.99x, but its 1:1 detail became a
    uniform fine grain: the top level keeps every layer, and with them its long brush strokes.
    """
    if preview is None or k != preview + 1:
        return settings
    weights = dict(zip(settings.style_layers, settings.layer_weights()))
    fine = [n for n in settings.style_layers if layer_geometry(n)[1] <= FINE_STRIDE]
    if not fine or len(fine) == len(settings.style_layers):
        return settings
    return settings.model_copy(update=dict(
        style_layers=tuple(fine), style_layer_weights=tuple(weights[n] for n in fine),
        style_weight=settings.style_weight * sum(weights[n] for n in fine)))


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


#: ``stop: done``: a level stops once its best loss improves by less than this fraction over
#: ``tolerance_window`` iterations. Calibrated with benchmarks/engine_quality.py (issue 15): the loss is then
#: within 1% of what 500 fixed full-size iterations reach, at about half the time of ``stop: converged``.
DONE_TOLERANCE = 1e-2


def stop_tolerance(s: Settings) -> float:
    """The relative improvement over ``tolerance_window`` below which a level stops; 0 never stops early."""
    if s.tolerance <= 0:
        return 0.0
    return s.tolerance if s.stop == "converged" else max(s.tolerance, DONE_TOLERANCE)


def converged(history: list[float], s: Settings) -> bool:
    """True when the best loss improved by less than ``stop_tolerance`` over the last window."""
    tolerance = stop_tolerance(s)
    if tolerance <= 0 or len(history) <= s.tolerance_window:
        return False
    before = min(history[: -s.tolerance_window])
    now = min(history)
    return before > 0 and (before - now) / before < tolerance
