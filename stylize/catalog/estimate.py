"""How long a run will take, from the engine seconds that earlier jobs of the same output recorded.

Work is counted in pixel-iterations: the pixels of each level times the
iterations run there. Earlier jobs' metadata give, per device kind (cpu, cuda,
mps), the engine seconds per pixel-iteration and the share of the planned
iterations that early stopping let them run; the jobs a plan would run give
their planned pixel-iterations from their photos' sizes and their settings.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Mapping

from PIL import Image

from stylize.catalog import metadata
from stylize.catalog.manifest import Job
from stylize.catalog.runs import metadata_files, read_many
from stylize.catalog.storage import Storage
from stylize.engine.schedule import level_sizes

__all__ = ["HISTORY_LIMIT", "Rate", "job_work", "history", "planned_work", "Estimate"]

#: Metadata files read for the history: enough for a steady rate, few enough to stay quick on S3.
HISTORY_LIMIT = 2000


@dataclass
class Rate:
    """Engine time per unit of work on one kind of device, from earlier jobs."""

    kind: str
    jobs: int = 0
    seconds: float = 0.0
    work: float = 0.0  # pixel-iterations run
    planned: float = 0.0  # pixel-iterations the settings allowed

    @property
    def seconds_per_work(self) -> float:
        """Engine seconds per pixel-iteration run."""
        return self.seconds / self.work

    @property
    def ran(self) -> float:
        """The share of the planned iterations that jobs ran (early stopping ends levels sooner)."""
        return self.work / self.planned if self.planned else 1.0

    def estimate(self, planned: float) -> float:
        """Engine seconds for ``planned`` pixel-iterations."""
        return planned * self.ran * self.seconds_per_work


def job_work(meta: Mapping[str, Any]) -> tuple[str, float, float, float] | None:
    """(device kind, engine seconds, pixel-iterations run, pixel-iterations planned) of a finished
    job's metadata, or None when it lacks what the count needs."""
    try:
        engine, losses, settings = meta["engine"], meta["losses"], meta["settings"]
        sizes = [int(w) * int(h) for w, h in engine["sizes"]]
        seconds, iterations = float(engine["seconds"]), int(settings["iterations"])
        scales = list(losses["scale"])[1:]  # record 0 is the starting image, before any iteration
        kind = str(meta["device"]).split(":")[0]
    except (KeyError, TypeError, ValueError):
        return None
    levels = list(dict.fromkeys(scales))  # level ids in the order they ran, coarse to fine
    if not sizes or len(levels) > len(sizes) or seconds <= 0:
        return None
    work = sum(sizes[levels.index(s)] for s in scales)
    return (kind, seconds, float(work), float(sum(sizes) * iterations)) if work else None


def history(storage: Storage, root: str, *, limit: int = HISTORY_LIMIT) -> dict[str, Rate]:
    """Rates per device kind from up to ``limit`` metadata files under ``root``; unreadable ones are ignored."""
    rates: dict[str, Rate] = {}
    files = (uri for _, uri in zip(range(limit), metadata_files(storage, root)))
    for _, meta, _ in read_many(storage, files, lambda uri: uri):
        if meta is None or meta.get("schema") != metadata.SCHEMA or (work := job_work(meta)) is None:
            continue
        kind, seconds, done, planned = work
        rate = rates.setdefault(kind, Rate(kind))
        rate.jobs += 1
        rate.seconds += seconds
        rate.work += done
        rate.planned += planned
    return rates


def planned_work(job: Job, content: bytes) -> float:
    """The pixel-iterations ``job`` may run: each level's pixels times ``settings.iterations``.

    Only the image header is read for its size (a rotated photo has the same pixels).
    """
    with Image.open(io.BytesIO(content)) as image:
        width, height = image.size
    return float(sum(w * h for w, h in level_sizes(width, height, job.settings)) * job.settings.iterations)


class Estimate:
    """Adds up the planned work of the jobs to run, then states the time per device kind."""

    def __init__(self, storage: Storage, root: str):
        self.root = root
        self.rates = history(storage, root)
        self.planned = 0.0
        self.jobs = 0
        self.unknown = 0  # jobs whose photo size could not be read

    def add(self, job: Job, content: bytes) -> None:
        """Count one job that the run would do."""
        try:
            self.planned += planned_work(job, content)
            self.jobs += 1
        except (OSError, ValueError, Image.DecompressionBombError):
            self.unknown += 1

    def lines(self) -> list[str]:
        """What ``stylize plan`` prints: one line per device kind, or that there is no history."""
        if not self.jobs:
            return [f"estimate: none ({self.unknown} job(s) to run, none with a readable photo)"] if self.unknown else []
        if not self.rates:
            return [f"estimate: no earlier jobs under {self.root} to estimate from; a first run records them"]
        out = []
        for rate in sorted(self.rates.values(), key=lambda r: -r.jobs):
            seconds = rate.estimate(self.planned)
            out.append(f"estimate on one {rate.kind} device: {_duration(seconds)} of engine time for {self.jobs} "
                       f"job(s) ({1e6 * rate.seconds_per_work:.3g} s per megapixel-iteration and "
                       f"{100 * rate.ran:.0f}% of the planned iterations, from {rate.jobs} earlier job(s))")
        if self.unknown:
            out.append(f"  ({self.unknown} job(s) left out: their photo's size could not be read)")
        return out


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"
