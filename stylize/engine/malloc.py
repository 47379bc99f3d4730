"""Keep freed memory in the process instead of handing it back to the kernel (glibc only).

An optimization iteration at 512 px allocates and frees a few dozen activation
and gradient tensors, the largest 45 MB (block 1: 64 channels x 340 x 512 x 4
bytes). glibc's malloc serves anything over its mmap threshold (at most 32 MB)
with a fresh ``mmap`` and unmaps it on ``free``; smaller blocks at the top of
the heap are trimmed back once more than the trim threshold is free. Either
way the next iteration touches new pages, and the kernel zero-fills every one
of them on its first write: on the 2-core CI machine that costs about 12 ms per
45 MB tensor (against 1.5 ms to zero the same tensor when its pages are
already mapped), and about 8% of a float32 iteration in all.

:func:`retain_freed_memory` sets glibc's ``M_MMAP_THRESHOLD`` to 64 MiB
(blocks below it come from the heap) and ``M_TRIM_THRESHOLD`` to its largest
value, 2 GiB (the heap is trimmed only when more than that is free at its
top), so the second iteration onwards reuses pages that are already mapped.
The process then keeps its high-water mark of heap until it exits, as
PyTorch's CUDA caching allocator does with GPU memory.

Blocks of 64 MiB and more (a print's activations, image-sized vectors,
L-BFGS's history) are still mapped and unmapped one by one: on the heap, the
blocks of different sizes that a print allocates and frees left free holes
that no later block fitted, all resident. A 3-level 1536 px run (384, 768,
1536 px, 6 iterations each, bfloat16, ``--max-memory 4GiB``) peaked at 4385
MiB RSS with every block on the heap (``M_MMAP_MAX`` 0, the first version of
this module), against 2963 MiB of live blocks; the full print, 255
iterations, at 7.0 GB. At a print's sizes the page faults cost little beside
an iteration of tens of seconds. :func:`release_freed_memory`
(``malloc_trim``) hands the heap's free pages back; ``Engine`` calls it as
each level starts, so the levels before leave nothing resident, and after
every evaluation of a level of RELEASE_EACH_STEP_PIXELS or more: the smaller
blocks' holes otherwise become resident over the iterations (1024x680,
bfloat16, whole image: 1919 MiB RSS after 5 iterations, 2608 MiB after 60,
for 1806 and 1813 MiB of live blocks).

That trim comes after the evaluation, and a tiled bfloat16 pass's peak is
within it: its blocks of 4-64 MiB (a tile's activations, and at 2048 px the
33 MB image-sized vectors) left holes that were resident at the peak. A
2048x1362 level in tiles of 512 px, bfloat16, under ``--max-memory 3GiB``
peaked at 4199 MiB RSS for 2347 MiB of live blocks. So
:func:`start_level`, which ``Engine`` calls as each level starts, sets the
mmap threshold to LARGE_LEVEL_MMAP_THRESHOLD (4 MiB) for levels of
RELEASE_EACH_STEP_PIXELS or more whose estimate is close to their budget
(:func:`tight`), and back to MMAP_THRESHOLD otherwise: the same level then
peaked at 3021 MiB (issue 13, notes/13-bf16.md). It costs system time (each
freed block is unmapped, each new one faulted in again): on the idle host a
tiled 1024 px level ran 12% slower with it, so a level with room under its
budget does without.

It changes a process-wide setting, so
``Engine`` calls it only for CPU engines (``retain_memory=False`` opts out),
and it steps aside when the user tunes malloc already: a ``MALLOC_*`` or
``GLIBC_TUNABLES`` environment variable, or another allocator (jemalloc,
tcmalloc, mimalloc) in ``LD_PRELOAD``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import threading

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Blocks this large or larger are mapped on their own and unmapped when freed (see the module docstring).
MMAP_THRESHOLD = 64 * 2**20
#: Levels of this many pixels or more give the heap's free pages back after every evaluation (see the module
#: docstring); smaller ones keep them, for speed.
RELEASE_EACH_STEP_PIXELS = 1024 * 512

#: The mmap threshold on levels of RELEASE_EACH_STEP_PIXELS or more (see the module docstring and
#: :func:`start_level`).
LARGE_LEVEL_MMAP_THRESHOLD = 4 * 2**20

#: A level whose estimate is at most this share of its budget keeps the 64 MiB threshold. Its VGG pass
#: then holds more RSS than ``budget.estimate`` counts (which is measured with 4 MiB): up to 1.9x, for
#: float32 tiles of 512 px (``benchmarks/pass_memory.py --roomy``, 2026-12-07), so at most half the budget
#: keeps such a level within it. Mapping 4-64 MiB blocks on their own costs time: a 1024x681 float32 level
#: in tiles of 512 px spent 22.8 s of system time in 10 iterations against 5.8 s, 7.2 s an iteration
#: against 6.4; a bfloat16 tile pass of 512 px, 8.2 s against 5.8 (2026-12-07).
TIGHT_SHARE = 0.5


def tight(estimate: int, budget: int | None) -> bool:
    """Whether a level's ``estimate`` (bytes) is close enough to its ``budget`` to map 4 MiB blocks on their own."""
    return budget is not None and estimate > TIGHT_SHARE * budget


#: mallopt takes a C int.
LARGEST = 2**31 - 1

_lock = threading.Lock()
_state: str | None = None  # what the first call did: "tuned" or why not


def user_tunes_malloc(environ: dict[str, str] | None = None) -> str | None:
    """Why the user's own malloc settings should stand, or None if there are none."""
    environ = os.environ if environ is None else environ
    for name in sorted(environ):
        if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES":
            return f"{name} is set"
    preload = environ.get("LD_PRELOAD", "")
    for allocator in ("jemalloc", "tcmalloc", "mimalloc"):
        if allocator in preload:
            return f"{allocator} is preloaded"
    return None


def retain_freed_memory() -> str:
    """Tune glibc's malloc once per process (see the module docstring); return what was done.

    ``"tuned"``, or the reason it was left alone: not Linux with glibc, the
    user's own settings, or ``mallopt`` refusing a value.
    """
    global _state
    with _lock:
        if _state is None:
            _state = _tune()
        return _state


def _tune() -> str:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    reason = user_tunes_malloc()
    if reason:
        return reason
    libc = _libc()
    if not libc.mallopt(M_TRIM_THRESHOLD, LARGEST):
        return "mallopt(M_TRIM_THRESHOLD) failed"
    if not libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return "mallopt(M_MMAP_THRESHOLD) failed"
    return "tuned"


def release_freed_memory() -> bool:
    """Give the kernel back every free page of the heap (glibc's ``malloc_trim(0)``); True if it did.

    Only where :func:`retain_freed_memory` tuned malloc: otherwise large blocks
    are unmapped when freed anyway. A few milliseconds; the pages the next
    allocations touch are zero-filled again, once.
    """
    if _state != "tuned":
        return False
    return bool(_libc().malloc_trim(0))


def start_level(pixels: int, near_budget: bool) -> bool:
    """As a level of ``pixels`` (all images) starts: the mmap threshold for its size and budget
    (``near_budget``: see :func:`tight`), then :func:`release_freed_memory`. True if malloc is tuned (see the
    module docstring)."""
    if _state != "tuned":
        return False
    small_blocks = pixels >= RELEASE_EACH_STEP_PIXELS and near_budget
    _libc().mallopt(M_MMAP_THRESHOLD, LARGE_LEVEL_MMAP_THRESHOLD if small_blocks else MMAP_THRESHOLD)
    return release_freed_memory()


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, found once (``find_library`` searches the system each time; a print's levels
    call ``release_freed_memory`` after every evaluation)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc
