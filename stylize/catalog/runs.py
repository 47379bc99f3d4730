"""What a catalog run leaves under ``OUTPUT/_runs/``, and reading it back.

``_runs/<run-id>.json`` is the run's summary (counts, wall and engine
seconds, devices, every failure); ``_runs/<run-id>/jobs-000000.json``,
``jobs-000001.json``, ... list every job of the run with its outcome, 500 to
a file, written while the run goes so that its memory stays flat however
many jobs it has. ``_runs/<run-id>.html`` is its report (see ``report.py``).
Together with the jobs' own metadata files these are everything a report
needs, so ``stylize report`` can rebuild one long after the run.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

from stylize.catalog.storage import Storage, child, relative_to
from stylize.catalog.thumbnails import THUMBS
from stylize.errors import NotFoundError, StorageError

__all__ = ["RUNS", "RUN_SCHEMA", "JOBS_SCHEMA", "JobLog", "Problems", "summary_uri", "report_uri", "job_log_uri",
           "read_json", "metadata_files", "read_many", "read_job_log", "list_runs", "device_utilization",
           "format_utilization", "slot_seconds"]

RUNS = "_runs"
RUN_SCHEMA = "stylize.run/v1"
JOBS_SCHEMA = "stylize.run-jobs/v1"
#: Jobs per job-log file: one report page's worth, so a page is built from one file.
CHUNK = 500
READ_AHEAD = 64  # JSON files read concurrently by read_many
log = logging.getLogger(__name__)
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def device_utilization(engine_seconds: float, slot_seconds: float) -> float | None:
    """The share of the devices' time spent optimizing: engine seconds (each batch counted once,
    see ``Outcome.engine_seconds``) over wall seconds times device slots; None for no time."""
    return round(engine_seconds / slot_seconds, 4) if slot_seconds > 0 else None


def slot_seconds(summary: dict[str, Any]) -> float:
    """A run summary's wall seconds times its device slots (``device_slots``; older summaries: one
    per entry of ``devices``), the denominator of ``device_utilization``."""
    slots = summary.get("device_slots")
    if not isinstance(slots, int) or isinstance(slots, bool):
        devices = summary.get("devices")
        slots = max(1, len(devices)) if isinstance(devices, list) else 1
    seconds = summary.get("seconds")
    return float(seconds) * slots if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else 0.0


def format_utilization(value: float | None) -> str:
    """``device_utilization`` as the terminal, the artifacts and the report show it: ``87%``."""
    return "-" if value is None else f"{100 * value:.0f}%"


def summary_uri(root: str, run_id: str) -> str:
    """``OUTPUT/_runs/<run_id>.json``."""
    return child(root, f"{RUNS}/{run_id}.json")


def report_uri(root: str, run_id: str) -> str:
    """``OUTPUT/_runs/<run_id>.html``, the first page of the run's report."""
    return child(root, f"{RUNS}/{run_id}.html")


def job_log_uri(root: str, run_id: str, index: int) -> str:
    """``OUTPUT/_runs/<run_id>/jobs-<index>.json``: the run's jobs ``index * CHUNK`` onwards."""
    return child(root, f"{RUNS}/{run_id}/jobs-{index:06d}.json")


class JobLog:
    """Writes a run's job rows (``Outcome.as_row()``) to its job log, ``CHUNK`` per file.

    A file that cannot be written is logged and left out (its jobs are missing
    from the report, which says so); it never stops the run. ``files`` counts
    the files the log meant to write, for the summary, so a reader knows how
    many to expect.
    """

    def __init__(self, storage: Storage, root: str, run_id: str):
        self.storage, self.root, self.run_id = storage, root, run_id
        self._rows: list[dict[str, Any]] = []
        self.files = 0

    def add(self, row: dict[str, Any]) -> None:
        """Record one finished job; writes a file each ``CHUNK`` jobs."""
        self._rows.append(row)
        if len(self._rows) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        """Write the rows held so far (at the end of the run: the last, partial file)."""
        if not self._rows:
            return
        uri = job_log_uri(self.root, self.run_id, self.files)
        document = {"schema": JOBS_SCHEMA, "run": self.run_id, "index": self.files, "jobs": self._rows}
        data = json.dumps(document, ensure_ascii=False, allow_nan=False).encode("utf-8")
        try:
            self.storage.write(uri, data, content_type="application/json")
        except StorageError as exc:  # the jobs' own outputs matter; their listing is for the report
            log.warning("job log %s not written (%d jobs left out of the report): %s", uri, len(self._rows), exc)
        self.files += 1
        self._rows = []


def read_json(storage: Storage, uri: str) -> tuple[dict | None, str | None]:
    """(the JSON object at ``uri``, None), or (None, why it cannot be used)."""
    try:
        data = storage.read(uri)
    except NotFoundError:
        return None, "missing"
    except StorageError as exc:
        return None, str(exc)
    try:
        document = json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return None, f"not JSON ({exc})"
    if not isinstance(document, dict):
        return None, f"expected a JSON object, found {type(document).__name__}"
    return document, None


class Problems:
    """Files that a reader skipped: the first ``shown_at_most`` as (uri, why), and how many in all."""

    def __init__(self, shown_at_most: int = 50):
        self.shown: list[tuple[str, str]] = []
        self.count = 0
        self._limit = shown_at_most

    def append(self, problem: tuple[str, str]) -> None:
        """Record one skipped file as (uri, why)."""
        self.count += 1
        if len(self.shown) < self._limit:
            self.shown.append(problem)

    def __len__(self) -> int:
        return self.count


def metadata_files(storage: Storage, root: str) -> Iterator[str]:
    """Every ``.json`` under the output root but the run files and thumbnails: the jobs' metadata
    (and whatever else a user put there), listed lazily."""
    try:
        for uri in storage.list(root):
            rel = relative_to(uri, root)
            if rel.endswith(".json") and not rel.startswith((f"{RUNS}/", f"{THUMBS}/")):
                yield uri
    except NotFoundError:
        return


def read_many(storage: Storage, items: Iterable[Any], uri_of: Callable[[Any], str | None]
                ) -> Iterator[tuple[Any, dict | None, str | None]]:
    """(item, JSON object or None, why not) for each item, in order, reading the JSON at ``uri_of(item)``
    (None: nothing to read) ``READ_AHEAD`` files at a time on 8 threads: S3 GETs wait on latency."""
    def read(item):
        uri = uri_of(item)
        return (None, None) if uri is None else read_json(storage, uri)

    it = iter(items)
    with ThreadPoolExecutor(8) as pool:
        while window := list(islice(it, READ_AHEAD)):
            for item, (document, why) in zip(window, pool.map(read, window)):
                yield item, document, why


def read_job_log(storage: Storage, root: str, run_id: str, problems: Problems,
                 files: int | None = None) -> Iterator[dict]:
    """The run's job rows in the order they finished, one file at a time.

    ``files`` is how many files the run wrote (its summary's ``job_log_files``);
    without it the log ends at the first missing file. A file that cannot be
    read is skipped and appended to ``problems`` as (uri, why).
    """
    index = 0
    while files is None or index < files:
        uri = job_log_uri(root, run_id, index)
        document, why = read_json(storage, uri)
        if why == "missing" and files is None:
            return
        index += 1
        jobs = document.get("jobs") if document is not None else None
        if document is not None and (document.get("schema") != JOBS_SCHEMA or not isinstance(jobs, list)):
            why = f"expected schema {JOBS_SCHEMA} with a list of jobs, found {document.get('schema')!r}"
        if why is not None:
            problems.append((uri, why))
            continue
        yield from (row for row in jobs if isinstance(row, dict) and isinstance(row.get("job"), str))


def list_runs(storage: Storage, root: str, problems: Problems) -> Iterator[dict]:
    """Every run summary directly under ``OUTPUT/_runs/``, in listing order.

    Unreadable files, and JSON files that are not run summaries, are
    appended to ``problems`` as (uri, why).
    """
    folder = child(root, RUNS)
    try:
        uris = [u for u in storage.list(folder) if _is_summary_name(relative_to(u, folder))]
    except NotFoundError:
        return
    for uri in uris:
        document, why = read_json(storage, uri)
        if document is not None and document.get("schema") != RUN_SCHEMA:
            document, why = None, f"expected schema {RUN_SCHEMA}, found {document.get('schema')!r}"
        if document is None:
            problems.append((uri, why or "unreadable"))
            continue
        yield document


def _is_summary_name(name: str) -> bool:
    return name.endswith(".json") and "/" not in name and bool(_RUN_ID.match(name[:-5]))


def valid_run_id(run_id: str) -> bool:
    """True if ``run_id`` can name files under ``_runs/`` (letters, digits, ``.``, ``_``, ``-``)."""
    return bool(_RUN_ID.match(run_id)) and ".." not in run_id
