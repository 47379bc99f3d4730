"""Keeping a bounded number of jobs in flight, with no barrier between groups.

A catalog's groups (``batching.group_jobs``) are submitted to whatever runs
them (a Prefect task runner, a thread pool) while fewer than ``bound`` jobs
are submitted and unfinished; as soon as one group finishes, the next goes.
Devices never idle waiting for the slowest job of a window, and memory holds
at most ``bound`` jobs' futures however long the catalog is.

The runner is reached through two callables, so this module knows neither
Prefect nor threads: ``submit(group)`` returns a future (anything hashable),
and ``first_done(futures)`` blocks until one of them has finished and returns
it (``concurrent.futures.wait(..., return_when=FIRST_COMPLETED)``, or
``prefect.futures.as_completed``).
"""

from __future__ import annotations

from typing import Callable, Collection, Hashable, Iterable, Iterator, TypeVar

from stylize.catalog.manifest import Job

__all__ = ["sliding_window"]

F = TypeVar("F", bound=Hashable)


def sliding_window(groups: Iterable[list[Job]], bound: int, submit: Callable[[list[Job]], F],
                   first_done: Callable[[Collection[F]], F]) -> Iterator[tuple[F, list[Job]]]:
    """Submit ``groups`` in order while at most ``bound`` jobs are in flight; yield each finished
    ``(future, group)`` as it finishes (not in submission order).

    A group larger than ``bound`` still goes, alone. The next group is pulled from ``groups`` only
    when it can be submitted, so a lazy ``groups`` is read no faster than the jobs run.
    """
    if bound < 1:
        raise ValueError(f"bound: expected at least 1 job in flight, found {bound}")
    pending: dict[F, list[Job]] = {}
    jobs = 0
    for group in groups:
        while pending and jobs + len(group) > bound:
            future = first_done(pending.keys())
            done = pending.pop(future)
            jobs -= len(done)
            yield future, done
        pending[submit(group)] = group
        jobs += len(group)
    while pending:
        future = first_done(pending.keys())
        yield future, pending.pop(future)
