"""Which devices a catalog run uses, and a per-process pool that hands them out.

One job runs at a time on each GPU (jobs on one GPU would only queue for its
compute and split its memory); on the CPU, ``workers`` jobs share the cores.
Each device has one ``JobRunner`` per process, so VGG19 is loaded once per
device and style targets are shared by every job on it.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from typing import Iterator, Sequence

from stylize.errors import ConfigError
from stylize.catalog.jobs import JobRunner


def plan_devices(devices: Sequence[str] | None = None, workers: int | None = None) -> list[str]:
    """Device slots for a run: one per GPU, or ``workers`` CPU slots.

    ``devices=None`` means every visible GPU, else the CPU. ``workers`` caps the
    number of GPU slots, or sets the number of CPU slots (default 1: one job
    already uses every core).
    """
    import torch

    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1, found {workers}")
    if not devices:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = [f"cuda:{i}" for i in range(count)] or ["cpu"]
    devices = [d.strip().lower() for d in devices]
    if devices == ["cpu"]:
        return ["cpu"] * (workers or 1)
    return devices[: workers] if workers else devices


@functools.cache
def runner_for(device: str) -> JobRunner:
    """The process's JobRunner for ``device`` (model and style targets cached there)."""
    return JobRunner(device)


class DevicePool:
    """Hands each running job a free device slot; blocks while all are busy."""

    def __init__(self, slots: Sequence[str]):
        self._free: queue.Queue[str] = queue.Queue()
        for slot in slots:
            self._free.put(slot)

    @contextlib.contextmanager
    def device(self) -> Iterator[str]:
        slot = self._free.get()
        try:
            yield slot
        finally:
            self._free.put(slot)


_pools: dict[tuple[str, ...], DevicePool] = {}
_pools_lock = threading.Lock()


def pool_for(slots: Sequence[str]) -> DevicePool:
    """The process-wide pool for these slots, so concurrent runs in one process share devices."""
    key = tuple(slots)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = DevicePool(key)
        return _pools[key]
