"""What ``stylize run`` shows: a progress bar over jobs and the current job's iteration.

The catalog flow reports on the ``stylize.app.view`` logger (events "job"
and "iteration" with structured ``extra``); ``RunView`` listens there, so the
flow needs no knowledge of terminals and the view none of Prefect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator

PROGRESS_LOGGER = "stylize.app.view"


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


class RunView(logging.Handler):
    """Draws the run's progress from ``stylize.app.view`` records (on stderr, when it is a terminal)."""

    def __init__(self, *, enabled: bool = True):
        super().__init__(level=logging.DEBUG)
        self.enabled = enabled and (sys.stderr.isatty() or os.environ.get("STYLIZE_PROGRESS") == "1")
        self._progress = None
        self._jobs = None
        self._current = None

    def __enter__(self) -> "RunView":
        logger = logging.getLogger(PROGRESS_LOGGER)
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG if self.enabled else logging.INFO)
        logger.propagate = False
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._progress.start()
            self._jobs = self._progress.add_task("jobs", total=None, detail="")
            self._current = self._progress.add_task("", total=None, detail="", visible=False)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger(PROGRESS_LOGGER)
        logger.removeHandler(self)
        if self._progress is not None:
            self._progress.stop()

    def emit(self, record: logging.LogRecord) -> None:
        if self._progress is None:
            return
        try:
            message = record.getMessage()
            if message == "start":
                self._progress.update(self._jobs, total=record.total)
            elif message == "job":
                outcome = record.outcome
                self._progress.update(self._jobs, completed=record.finished,
                                      detail=f"last: {outcome.job} {outcome.status}")
            elif message == "iteration":
                rec = record.record
                self._progress.update(
                    self._current, visible=True, description=f"{record.job} (scale {rec.scale})",
                    completed=rec.iteration, detail=f"loss {rec.total:.4g}",
                )
        except Exception:  # a display problem must never stop a run
            self.handleError(record)

    def print_summary(self, summary: dict[str, Any]) -> None:
        """The end-of-run table: totals, then each failure with its message."""
        from rich.console import Console
        from rich.table import Table

        console = Console()
        c = summary["counts"]
        table = Table(title=f"stylize run: {summary['manifest']}", show_header=True)
        for column in ("done", "skipped", "failed", "total", "seconds"):
            table.add_column(column, justify="right")
        table.add_row(str(c["done"]), str(c["skipped"]), str(c["failed"]), str(c["total"]),
                      f"{summary['seconds']:.1f}")
        console.print(table)
        # soft_wrap: one line per failure however long (the terminal folds it, rich does not
        # break it), so the lines can be read, grepped and counted.
        for failure in summary["failures"][:50]:
            console.print(f"[red]failed[/red] {failure['job']}: {failure['error']}", markup=True, highlight=False,
                          soft_wrap=True)
        if len(summary["failures"]) > 50:
            console.print(f"... and {len(summary['failures']) - 50} more failures")
        console.print(f"outputs in {summary['output']}; summary at {summary['summary_uri']}", highlight=False,
                      soft_wrap=True)
