"""What the terminal shows while ``stylize image`` or ``stylize run`` works, and after.

Runs report typed events (``stylize.catalog.progress``); ``ProgressView``
subscribes to them and draws them with rich, so the flow needs no knowledge
of terminals and the view none of Prefect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from typing import Any, Iterator

from stylize.catalog import progress
from stylize.catalog.runs import format_utilization


# C0 and C1 controls, DEL, line and paragraph separators, and the bidirectional overrides that
# can make a name read backwards: none reaches the terminal raw.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\n``, ``\\u202e``).

    File names come from whoever uploaded the photos; one with an escape
    sequence or a newline must not move the cursor, recolour the terminal or
    forge a line of output. Everything that prints a name, a URI or a message
    that may hold one goes through here.
    """
    return _UNPRINTABLE.sub(lambda m: _SHORT.get(m[0]) or (f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100
                                                          else f"\\u{ord(m[0]):04x}"), str(text))


def plain(text: object) -> str:
    """``printable`` text that rich prints as written: no ``[markup]`` taken from a name."""
    from rich.markup import escape

    return escape(printable(text))


class PrintableFormatter(logging.Formatter):
    """A log formatter that escapes control characters (``printable``), tracebacks excepted:
    the watcher logs the keys of uploaded objects, and a key is anyone's choice of bytes."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def quiet_prefect() -> None:
    """Environment for a clean in-process run: no telemetry, Prefect's own logs at WARNING.

    Only defaults: anything the user set stays.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")


class _NoRunTracebacks(logging.Filter):
    """Drops Prefect's records of a run's exception (with their traceback) on the way to stderr.

    A run whose jobs failed ends with ``CatalogFailed``; the summary table already says which
    jobs failed and why, so its traceback is noise there. The record still reaches Prefect's
    API handler (attached to the run loggers, not to the root), and the flow run is still
    recorded as failed.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.name.startswith(("prefect.flow_runs", "prefect.task_runs")))


@contextlib.contextmanager
def quiet_failures(*, verbose: bool) -> Iterator[None]:
    """Within: no Prefect run traceback on stderr, unless ``verbose`` (-v): then it goes to the log."""
    if verbose:
        yield
        return
    quiet = _NoRunTracebacks()
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


class ProgressView:
    """Draws a run's progress events on stderr, when it is a terminal (or ``STYLIZE_PROGRESS=1``).

    One view for every command: a bar over jobs once a run starts
    (``RunStarted``, ``JobFinished``), and one over the current job's
    iterations at its current level, with its losses (``Iteration``).
    ``stylize image`` sends iterations only, so it shows the second bar
    alone. Within ``with``, the view listens to ``stylize.catalog.progress``
    in this thread and the threads started from it (the flow's tasks).
    ``transient`` clears the bars at the end.
    """

    def __init__(self, *, enabled: bool = True, transient: bool = False):
        self.enabled = enabled and (sys.stderr.isatty() or os.environ.get("STYLIZE_PROGRESS") == "1")
        self.transient = transient
        self._progress = None
        self._stack = contextlib.ExitStack()
        self._lock = threading.Lock()  # events come from the flow's task threads
        self._jobs = self._iterations = None
        self._level: tuple[str, int] | None = None  # (job, scale) the iteration bar shows
        self._first = 0  # iteration at which that level started

    def __enter__(self) -> "ProgressView":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                console=Console(stderr=True), transient=self.transient,
            )
            self._progress.start()
            self._stack.callback(self._progress.stop)
            self._stack.enter_context(progress.reporting(self.show))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def show(self, event: progress.Event) -> None:
        """Draw one event (called from any thread)."""
        if self._progress is None:
            return
        with self._lock:
            if isinstance(event, progress.RunStarted):
                self._jobs = self._progress.add_task("jobs", total=event.total, detail="")
            elif isinstance(event, progress.JobFinished) and self._jobs is not None:
                outcome = event.outcome
                self._progress.update(self._jobs, completed=event.finished,
                                      detail=f"last: {plain(outcome.job)} {outcome.status}")
            elif isinstance(event, progress.Iteration):
                self._iteration(event)

    def _iteration(self, event: progress.Iteration) -> None:
        rec = event.record
        if self._iterations is None:
            self._iterations = self._progress.add_task("", total=event.limit, detail="")
        if (event.job, rec.scale) != self._level:  # a new job or level: the bar starts over
            self._level, self._first = (event.job, rec.scale), rec.iteration
            self._progress.reset(self._iterations, total=event.limit)
        self._progress.update(
            self._iterations, completed=rec.iteration - self._first,
            description=f"{plain(event.job)} (scale {rec.scale})",
            detail=f"loss {rec.total:.4g} (c {rec.content:.3g} s {rec.style:.3g} tv {rec.tv:.3g})",
        )

    def print_summary(self, summary: dict[str, Any]) -> None:
        """The end-of-run table: totals, then each failure with its message."""
        from rich.console import Console
        from rich.table import Table

        console = Console()
        c = summary["counts"]
        table = Table(title=f"stylize run: {plain(summary['manifest'])}", show_header=True)
        for column in ("done", "skipped", "failed", "total", "seconds", "device utilization"):
            table.add_column(column, justify="right")
        table.add_row(str(c["done"]), str(c["skipped"]), str(c["failed"]), str(c["total"]),
                      f"{summary['seconds']:.1f}", format_utilization(summary.get("device_utilization")))
        console.print(table)
        # soft_wrap: one line per failure however long (the terminal folds it, rich does not
        # break it), so the lines can be read, grepped and counted.
        for failure in summary["failures"][:50]:
            console.print(f"[red]failed[/red] {plain(failure['job'])}: {plain(failure['error'])}", markup=True,
                          highlight=False, soft_wrap=True)
        if len(summary["failures"]) > 50:
            console.print(f"... and {len(summary['failures']) - 50} more failures")
        console.print(f"outputs in {plain(summary['output'])}; summary at {plain(summary['summary_uri'])}",
                      highlight=False, soft_wrap=True)
