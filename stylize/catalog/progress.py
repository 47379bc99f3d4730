"""What a run reports while it goes: small typed events, handed to whoever listens.

A run (the catalog flow, or ``stylize image`` for one job) calls ``emit``
with a ``RunStarted``, then an ``Iteration`` per optimizer step of each job
and a ``JobFinished`` per job. A view subscribes for a stretch of code with
``reporting(sink)``; the sink lives in a context variable, so it reaches
every thread the run starts with a copy of the context (Prefect's task
threads do), and ``emit`` is a no-op where nobody listens: a run started
from a deployment, or a task on a Dask worker.

No logging and no magic strings: a view matches on the event's type.
"""

from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Union

if TYPE_CHECKING:  # pragma: no cover - types only: this module stays free of torch
    from stylize.catalog.jobs import Outcome
    from stylize.engine.optimize import Record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunStarted:
    """A run begins: ``total`` jobs to go through (skipped ones included)."""

    total: int


@dataclass(frozen=True)
class Iteration:
    """One optimizer step of job ``job``; ``limit`` is its iterations per level (``settings.iterations``)."""

    job: str
    record: "Record"
    limit: int


@dataclass(frozen=True)
class JobFinished:
    """A job is done, skipped or failed (``outcome``); ``finished`` jobs of ``total`` so far."""

    outcome: "Outcome"
    finished: int
    total: int


Event = Union[RunStarted, Iteration, JobFinished]
Sink = Callable[[Event], None]

_sink: ContextVar[Sink | None] = ContextVar("stylize_progress_sink", default=None)


@contextlib.contextmanager
def reporting(sink: Sink) -> Iterator[None]:
    """Within: events emitted here, and in threads started from here, go to ``sink``."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


def emit(event: Event) -> None:
    """Hand ``event`` to the current sink, if any. A failing sink is logged, never raised:
    a display problem must not stop a run."""
    sink = _sink.get()
    if sink is None:
        return
    try:
        sink(event)
    except Exception:
        log.exception("progress sink failed on %s", type(event).__name__)
