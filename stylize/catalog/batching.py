"""Grouping a catalog's jobs into batches that fill, over a bounded look-ahead.

A batch shares one VGG19 pass per iteration, so its jobs must share styles and
settings; photos of different shapes can share it padded to the batch's
largest width and height (the engine masks the padding out of every loss and
every convolution, ``stylize.engine.losses.Valid``, so each picture is the one
it gets alone). Padding costs device time, though: a batch's pixels are those
of its bounding box. So jobs are grouped by

1. styles and settings, exactly;
2. shape: the output size each photo gets (``fit_size`` at ``settings.size``).
   A shape with ``per_batch`` jobs waiting is a full batch with no padding and
   goes at once.
3. When a job has waited ``lookahead`` jobs without filling its shape's batch,
   its batch is completed from other shapes of the same styles and settings,
   the best fitting first, as long as the images' own pixels stay at least
   ``min_fill`` of the padded batch; what cannot be filled that way goes as a
   smaller batch.

The look-ahead is a bound, not a window: at most ``lookahead`` jobs wait, so
memory stays flat over 100,000 jobs, and each job is handed on within
``lookahead`` jobs of its arrival. Shapes come from the photos' headers
(``image_size``: the first bytes only, one ranged GET on S3); a photo whose
header says nothing groups with the others of unknown shape.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Iterator

from PIL import Image, UnidentifiedImageError

from stylize.catalog.manifest import Job
from stylize.catalog.storage import Storage
from stylize.engine.images import fit_size
from stylize.errors import Cancelled, StorageError

__all__ = ["LOOKAHEAD", "MIN_FILL", "HEAD_BYTES", "SHAPE_CACHE", "image_size", "header_shapes",
           "output_shape", "padded_fill", "group_jobs"]

#: Jobs that may wait for a batch to fill. 1,024 jobs are about a megabyte; a catalog with a few dozen
#: (style, shape) combinations fills batches of 4 to 16 well within it.
LOOKAHEAD = 1024
#: Least share of a padded batch's pixels that belong to its images. 4:3, 3:2 and 16:9 photos together
#: fill 0.88 of their 4:3 box; a landscape with a portrait fills at most 0.75 of a square.
MIN_FILL = 0.8
#: Photos whose sizes ``header_shapes`` remembers: a grid names each photo once per style, in a row.
SHAPE_CACHE = 4096
#: Bytes read to find an image's size: PNG, GIF and WebP say it in the first 30; a JPEG after its
#: EXIF block, which camera thumbnails can make 60 KiB long.
HEAD_BYTES = 96 * 1024

Shape = tuple[int, int]  # (w, h)


def image_size(storage: Storage, uri: str) -> Shape | None:
    """(w, h) of the image at ``uri`` as decoding will see it (EXIF rotation applied), from its header;
    None when the header does not say or cannot be read (the job's own read reports the problem)."""
    try:
        head = storage.read_head(uri, HEAD_BYTES)
    except Cancelled:
        raise
    except StorageError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(head))
            w, h = image.size
            rotated = image.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return None
    return (h, w) if rotated else (w, h)


def header_shapes(storage: Storage, cache: int = SHAPE_CACHE) -> Callable[[Job], Shape | None]:
    """``shape_of`` for ``group_jobs``: each job's photo size from its header (``image_size``), the
    last ``cache`` photos remembered, so a photo with several styles is read once."""
    sizes = functools.lru_cache(maxsize=cache)(lambda uri: image_size(storage, uri))
    return lambda job: sizes(job.content)


def output_shape(job: Job, size: Shape | None) -> Shape | None:
    """The (w, h) of the job's output for a photo of ``size``: the shape batches are padded to."""
    if size is None or job.settings is None:
        return None
    return fit_size(*size, job.settings.size)


def padded_fill(shapes: Iterable[Shape]) -> float:
    """The images' own pixels over the pixels of their batch padded to the largest width and height."""
    shapes = list(shapes)
    box = max(w for w, _ in shapes) * max(h for _, h in shapes)
    return sum(w * h for w, h in shapes) / (len(shapes) * box)


@dataclass
class _Waiting:
    seq: int
    job: Job
    key: Hashable  # styles and settings
    shape: Shape | None


class _Buffer:
    """Waiting jobs by (styles, settings) and shape, and in arrival order."""

    def __init__(self) -> None:
        self.by_key: dict[Hashable, dict[Shape | None, deque[_Waiting]]] = {}
        self.order: deque[_Waiting] = deque()  # arrival order; entries already handed on are skipped
        self.gone: set[int] = set()  # seqs handed on ahead of their turn in ``order``
        self.count = 0

    def add(self, w: _Waiting) -> deque[_Waiting]:
        shapes = self.by_key.setdefault(w.key, {})
        shapes.setdefault(w.shape, deque()).append(w)
        self.order.append(w)
        self.count += 1
        return shapes[w.shape]

    def oldest(self) -> _Waiting | None:
        while self.order and self.order[0].seq in self.gone:
            self.gone.discard(self.order.popleft().seq)
        return self.order[0] if self.order else None

    def take(self, key: Hashable, shape: Shape | None, n: int) -> list[_Waiting]:
        """Up to ``n`` of the waiting jobs of ``key`` and ``shape``, oldest first."""
        shapes = self.by_key[key]
        queue = shapes[shape]
        taken = [queue.popleft() for _ in range(min(n, len(queue)))]
        if not queue:
            del shapes[shape]
            if not shapes:
                del self.by_key[key]
        for w in taken:
            self.gone.add(w.seq)
        self.count -= len(taken)
        return taken


def _complete(buffer: _Buffer, first: _Waiting, per_batch: int, min_fill: float) -> list[Job]:
    """A batch around ``first``: its shape's waiting jobs, then other shapes of its key while the fill
    stays at least ``min_fill`` (the best fitting shape first)."""
    group = buffer.take(first.key, first.shape, per_batch)
    if first.shape is None:
        return [w.job for w in group]
    while len(group) < per_batch:
        shapes = [w.shape for w in group]
        others = [s for s in buffer.by_key.get(first.key, {}) if s is not None]
        fills = {s: padded_fill(shapes + [s]) for s in others}
        best = max(fills, key=fills.get, default=None)
        if best is None or fills[best] < min_fill:
            break
        added = 0
        for _ in range(min(per_batch - len(group), len(buffer.by_key[first.key][best]))):
            if padded_fill(shapes + [best] * (added + 1)) < min_fill:
                break
            added += 1
        group += buffer.take(first.key, best, added)
    return [w.job for w in group]


def group_jobs(jobs: Iterable[Job], per_batch: int | Callable[[Job], int], *,
               shape_of: Callable[[Job], Shape | None], lookahead: int = LOOKAHEAD,
               min_fill: float = MIN_FILL) -> Iterator[list[Job]]:
    """Groups of 1 to ``per_batch`` jobs sharing styles and settings, shapes padded together filling at
    least ``min_fill`` of their batch; every job exactly once, lazily.

    ``per_batch`` may depend on the job (its settings); ``shape_of(job)`` gives the photo's (w, h) or None
    (see ``image_size``). A refused job (no settings) goes alone at once: it fails without a device.
    """
    buffer = _Buffer()
    for seq, job in enumerate(jobs):
        if job.settings is None:
            yield [job]
            continue
        w = _Waiting(seq, job, (job.styles, job.settings), output_shape(job, shape_of(job)))
        queue = buffer.add(w)
        n = per_batch(job) if callable(per_batch) else per_batch
        if len(queue) >= n:
            yield [x.job for x in buffer.take(w.key, w.shape, n)]
        oldest = buffer.oldest()
        if oldest is not None and seq - oldest.seq >= lookahead:
            yield _complete(buffer, oldest, per_batch(oldest.job) if callable(per_batch) else per_batch, min_fill)
    while (oldest := buffer.oldest()) is not None:
        yield _complete(buffer, oldest, per_batch(oldest.job) if callable(per_batch) else per_batch, min_fill)
