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

#: Coarse levels below this longest side carry too little structure to help.
MIN_LEVEL_SIZE = 64
#: Prints: above this longest side the schedule adds coarse levels down to PRINT_BASE px and gives each
#: level above it fewer iterations (``level_iterations``), so that a 4096 px print costs a few 1024 px
#: runs rather than 16. Up to 1024 px the schedule is ``scales`` and ``iterations`` as given.
PRINT_FROM = 1024
PRINT_BASE = 512
PRINT_MIN_ITERATIONS = 5


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


def converged(history: list[float], s: Settings) -> bool:
    """True when the best loss improved by less than ``tolerance`` over the last window."""
    if s.tolerance <= 0 or len(history) <= s.tolerance_window:
        return False
    before = min(history[: -s.tolerance_window])
    now = min(history)
    return before > 0 and (before - now) / before < s.tolerance
