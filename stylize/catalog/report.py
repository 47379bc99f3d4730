"""The HTML report of a catalog run, or of everything under an output root.

A report is built from metadata alone: the run's summary and job log
(``runs.py``) and each job's ``NAME.json``; images are referenced, never read,
through the thumbnails that jobs write (``thumbnails.py``). Pages hold
``PAGE_SIZE`` jobs each and are written as they fill, so building the report
of 100,000 jobs holds two pages in memory. The first page also has the
totals, the failures grouped by kind of error, the slowest jobs and a
histogram of job times; later pages sit in a folder named after it
(``_runs/<id>.html``, ``_runs/<id>/page-0002.html``, ...).

Everything is relative to the output root (``../_thumbs/NAME.jpg``), so a
report opens from a downloaded copy of the output folder or from S3 website
hosting; it loads nothing from elsewhere and has no script. Job names, error
messages and paths come from manifests and storage: Jinja2 escapes all of them
(autoescape), links are percent-encoded paths below the root, and a
Content-Security-Policy forbids scripts should anything slip through.
"""

from __future__ import annotations

import functools
import heapq
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import quote

from stylize import __version__
from stylize.catalog import metadata, runs
from stylize.catalog.runs import Problems, device_utilization, format_utilization, slot_seconds
from stylize.catalog.storage import Storage, child, is_s3, local_path, split_s3
from stylize.errors import ConfigError, NotFoundError

__all__ = ["PAGE_SIZE", "Report", "build_run_report", "build_catalog_report", "loss_curve"]

#: Jobs per page: about 2.5 MB of HTML and 1,500 thumbnails, which a browser takes in its stride.
PAGE_SIZE = 500
SLOWEST = 12  # jobs in the "slowest" table
FAILURES_SHOWN = 100  # per kind of error; the rest are counted


@dataclass
class Curve:
    """A loss curve as SVG coordinates (numbers only, nothing from users)."""

    series: list[tuple[str, str, str]]  # (label, colour, "x,y x,y ...")
    marks: list[tuple[float, str]]  # (x, label): where the scale (level) changes
    top: str  # the y axis' upper and lower values
    bottom: str
    last: int  # the last iteration


@dataclass
class Entry:
    """One job on the contact sheet."""

    name: str
    status: str  # done, skipped or failed
    seconds: float | None = None
    engine_seconds: float | None = None
    iterations: int | None = None
    device: str | None = None
    error: str | None = None
    kind: str | None = None
    field: str | None = None  # the manifest field a failure is about, e.g. pairs[2].content
    run: str | None = None
    output: str | None = None  # root-relative path of the image
    thumbs: dict[str, Any] | None = None  # root-relative {"output", "content", "styles"}
    curve: Curve | None = None
    index: int = 0  # position in the report
    page: int = 1
    links: dict[str, Any] | None = None  # hrefs from the entry's page, set when it is rendered

    @property
    def device_seconds(self) -> float | None:
        """The job's time on its device (the engine's), else its wall time, which includes waiting
        for a free device when a run submits more jobs than it has devices."""
        return self.engine_seconds if self.engine_seconds is not None else self.seconds

    @property
    def message(self) -> str:
        """The error without its leading field path (shown beside it)."""
        error = self.error or ""
        return error[len(self.field) + 2:] if self.field and error.startswith(f"{self.field}: ") else error


@dataclass
class Report:
    """What building a report wrote and found."""

    uri: str  # the first page
    pages: list[str]
    counts: dict[str, int]
    problems: int  # metadata files skipped because they could not be read


# --- loss curves ----------------------------------------------------------------------------

CURVE_W, CURVE_H = 260, 120
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 34, 6, 8, 16
SERIES = (("total", "#222222"), ("content", "#1f77b4"), ("style", "#d62728"), ("tv", "#2ca02c"))
MAX_POINTS = 64


def loss_curve(losses: Any) -> Curve | None:
    """The SVG geometry of a job's losses (metadata ``losses`` columns), log scale; None if unusable.

    At most ``MAX_POINTS`` evenly spaced records per series are drawn (and both
    sides of each scale change): a 260 px curve shows no more, and a page of 500
    curves stays small.
    """
    if not isinstance(losses, Mapping):
        return None
    its, scales = losses.get("iteration"), losses.get("scale")
    if not isinstance(its, list) or len(its) < 2:
        return None
    n = len(its)
    scales = scales if isinstance(scales, list) and len(scales) == n else [None] * n
    changes = [i for i in range(1, n) if scales[i] != scales[i - 1]]
    m = min(n, MAX_POINTS)
    picked = sorted({round(k * (n - 1) / (m - 1)) for k in range(m)} | set(changes) | {c - 1 for c in changes})
    if not all(_is_number(its[i]) for i in picked):
        return None
    columns = {}
    for label, _ in SERIES:
        column = losses.get(label)
        if isinstance(column, list) and len(column) == n:
            columns[label] = [(i, math.log10(v)) for i in picked if _is_number(v := column[i]) and v > 0]
    logs = [y for points in columns.values() for _, y in points]
    if not logs:
        return None
    lo, hi = min(logs), max(logs)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = its[0], its[-1] if its[-1] != its[0] else its[0] + 1
    x_scale = (CURVE_W - _PAD_L - _PAD_R) / (x1 - x0)
    y_scale = (CURVE_H - _PAD_T - _PAD_B) / (hi - lo)
    xs = {i: f"{_PAD_L + (its[i] - x0) * x_scale:.1f}" for i in picked}
    series = [(label, colour, " ".join(f"{xs[i]},{_PAD_T + (hi - v) * y_scale:.1f}" for i, v in columns[label]))
              for label, colour in SERIES if len(columns.get(label, ())) >= 2]
    marks = [(float(xs[i]), f"scale {scales[i]}") for i in changes]
    return Curve(series, marks, f"{10 ** hi:.0e}", f"{10 ** lo:.0e}", int(its[-1]))


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # not bool, a subclass of int


# --- entries from metadata --------------------------------------------------------------------

_FIELD = re.compile(r"^((?:pairs|grid|defaults|settings|content|style|styles|output|name)"
                    r"(?:\[\d+\])?(?:\.[A-Za-z_]+(?:\[\d+\])?)*): ")


def failure_field(message: str) -> str | None:
    """The manifest field path a job error starts with (``pairs[2].content: ...``), if any."""
    match = _FIELD.match(message or "")
    return match.group(1) if match else None


def safe_relative(path: Any) -> str | None:
    """``path`` if it is a plain relative path below the root (no ``..``, scheme, or absolute), else None."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return None
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts) or ":" in parts[0]:
        return None
    return path


def entry_from_metadata(meta: Mapping[str, Any], *, status: str = "done", run: str | None = None) -> Entry:
    """A contact-sheet entry from a job's metadata document (already checked to be one)."""
    name = meta["job"]
    engine = meta.get("engine") if isinstance(meta.get("engine"), Mapping) else {}
    losses = meta.get("losses") if isinstance(meta.get("losses"), Mapping) else {}
    its = losses.get("iteration") if isinstance(losses.get("iteration"), list) else []
    output = meta.get("output") if isinstance(meta.get("output"), Mapping) else {}
    ext = posixpath.splitext(str(output.get("uri", "")))[1]
    thumbs = meta.get("thumbnails") if isinstance(meta.get("thumbnails"), Mapping) else None
    if thumbs is not None:
        styles = thumbs.get("styles") if isinstance(thumbs.get("styles"), list) else []
        thumbs = {"output": safe_relative(thumbs.get("output")), "content": safe_relative(thumbs.get("content")),
                  "styles": [s for s in map(safe_relative, styles) if s]}
    return Entry(
        name=name, status=status,
        seconds=_number(meta.get("seconds")), engine_seconds=_number(engine.get("seconds")),
        iterations=int(its[-1]) if its and _is_number(its[-1]) else None,
        device=str(meta["device"]) if isinstance(meta.get("device"), str) else None, run=run,
        output=safe_relative(name + ext) if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", ext) else None,
        thumbs=thumbs, curve=loss_curve(losses),
    )


def _number(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def is_job_metadata(document: Mapping[str, Any] | None) -> str | None:
    """None if ``document`` is a job's metadata that a report can use, else why not."""
    if document is None:
        return "unreadable"
    if document.get("schema") != metadata.SCHEMA:
        return f"expected schema {metadata.SCHEMA}, found {document.get('schema')!r}"
    if not isinstance(document.get("job"), str) or not document["job"]:
        return "no job name"
    if document.get("pending"):
        return "pending: its job was writing its image, or stopped while it did"
    return None


def run_entries(storage: Storage, root: str, run_id: str, problems: Problems,
                files: int | None = None) -> Iterator[Entry]:
    """A run's jobs from its job log (``files`` long, when known), with curves and thumbnails
    from their metadata."""
    rows = runs.read_job_log(storage, root, run_id, problems, files)

    def uri_of(row):
        return None if row.get("status") == "failed" else child(root, f"{row['job']}.json")

    for row, meta, why in runs.read_many(storage, rows, uri_of):
        status = row.get("status") if row.get("status") in ("done", "skipped", "failed") else "failed"
        if status != "failed" and is_job_metadata(meta) is None and meta["job"] == row["job"]:
            entry = entry_from_metadata(meta, status=status, run=run_id)
        else:
            if status != "failed":
                problems.append((child(root, f"{row['job']}.json"), why or is_job_metadata(meta) or "another job"))
            entry = Entry(name=row["job"], status=status, run=run_id)
        # The row is this run's own account of the job: its times, its error.
        entry.seconds = _number(row.get("seconds"))
        entry.engine_seconds = _number(row.get("engine_seconds")) or entry.engine_seconds
        if status == "failed":
            entry.error = str(row.get("error") or "unknown error")
            entry.kind = str(row.get("kind") or "Error")
            entry.field = failure_field(entry.error)
        yield entry


def catalog_entries(storage: Storage, root: str, problems: Problems) -> Iterator[Entry]:
    """Every job with metadata under ``root``, in listing order."""
    for uri, meta, why in runs.read_many(storage, runs.metadata_files(storage, root), lambda uri: uri):
        reason = why or is_job_metadata(meta)
        if reason is not None:
            problems.append((uri, reason))
            continue
        yield entry_from_metadata(meta)


# --- totals -----------------------------------------------------------------------------------

#: Histogram bins: job seconds in [0, 0.5), [0.5, 1), [1, 2), ... doubling.
_BIN_EDGES = [0.0] + [0.5 * 2 ** k for k in range(22)]


class Stats:
    """What the first page shows about all jobs, in bounded memory."""

    def __init__(self):
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.bins = [0] * len(_BIN_EDGES)
        self.slowest: list[tuple[float, int, str, int]] = []  # heap of (seconds, index, name, page)
        self.failures: dict[str, list[Entry]] = {}
        self.failure_counts: dict[str, int] = {}

    def add(self, entry: Entry) -> None:
        """Count one job: its status, and its time (done jobs) or its failure."""
        self.counts[entry.status] = self.counts.get(entry.status, 0) + 1
        if entry.status == "failed":
            self.add_failure(entry)
        elif entry.status == "done" and entry.device_seconds is not None:
            self.bins[_bin(entry.device_seconds)] += 1
            item = (entry.device_seconds, -entry.index, entry.name, entry.page)
            (heapq.heappush if len(self.slowest) < SLOWEST else heapq.heappushpop)(self.slowest, item)

    def add_failure(self, entry: Entry) -> None:
        """File a failed job under its kind of error; past ``FAILURES_SHOWN`` a kind only counts."""
        kind = entry.kind or "Error"
        self.failure_counts[kind] = self.failure_counts.get(kind, 0) + 1
        shown = self.failures.setdefault(kind, [])
        if len(shown) < FAILURES_SHOWN:
            shown.append(entry)

    def histogram(self) -> list[dict[str, Any]]:
        """Bars from the first to the last non-empty bin: label, count, height in % of the tallest."""
        used = [i for i, n in enumerate(self.bins) if n]
        if not used:
            return []
        top = max(self.bins)
        return [{"label": _duration(_BIN_EDGES[i]) if i else "0", "count": self.bins[i],
                 "height": round(100 * self.bins[i] / top, 1)} for i in range(used[0], used[-1] + 1)]


def _bin(seconds: float) -> int:
    if seconds < _BIN_EDGES[1]:
        return 0
    return min(len(_BIN_EDGES) - 1, 1 + int(math.log2(seconds / _BIN_EDGES[1])))


def _duration(seconds: float | None) -> str:
    """``0.42 s``, ``12 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _when(stamp: Any) -> str:
    """An ISO timestamp as ``2026-12-02 02:00 UTC``; anything else as it is."""
    try:
        moment = datetime.fromisoformat(str(stamp))
    except ValueError:
        return str(stamp)
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def run_totals(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts, wall and engine time, device use and throughput over run summaries."""
    counts = {"done": 0, "skipped": 0, "failed": 0}
    wall = engine = slots = 0.0
    for s in summaries:
        c = s.get("counts") if isinstance(s.get("counts"), Mapping) else {}
        for key in counts:
            counts[key] += int(c.get(key) or 0) if _is_number(c.get(key)) else 0
        wall += _number(s.get("seconds")) or 0.0
        engine += _number(s.get("engine_seconds")) or 0.0
        slots += slot_seconds(s)
    return {
        **counts, "wall": wall, "engine": engine,
        "utilization": device_utilization(engine, slots),
        "per_hour": counts["done"] / wall * 3600 if wall else None,
    }


# --- pages ------------------------------------------------------------------------------------


class Pages:
    """Where each page goes and how pages and the output root are linked from each other."""

    def __init__(self, first: str, root: str, base_url: str | None):
        if not first.endswith(".html"):
            raise ConfigError(f"report {first}: expected a file name ending in .html")
        self.first, self.root = first, root
        self.stem = posixpath.basename(first.replace(os.sep, "/"))[:-5]
        if base_url and not re.fullmatch(r"https?://[^\s'\";,<>]+", base_url):
            raise ConfigError(f"base URL {base_url!r}: expected http:// or https:// and no spaces, quotes or ';'")
        self.base = base_url.rstrip("/") + "/" if base_url else None
        if self.base is None:
            self.to_root(first)  # refuse a place that cannot link to the root before building anything

    def uri(self, page: int) -> str:
        """Where page ``page`` (from 1) is written."""
        if page == 1:
            return self.first
        return child(self.first[:-5], f"page-{page:04d}.html") if is_s3(self.first) else \
            os.path.join(self.first[:-5], f"page-{page:04d}.html")

    def href(self, source: int, target: int) -> str:
        """The link from page ``source`` to page ``target``."""
        name = quote(self.stem)
        if target == 1:
            return f"{name}.html" if source == 1 else f"../{name}.html"
        return f"{name}/page-{target:04d}.html" if source == 1 else f"page-{target:04d}.html"

    def to_root(self, page_uri: str) -> str:
        """The prefix that turns a root-relative path into a link from ``page_uri``."""
        if self.base is not None:
            return self.base
        if is_s3(self.root) or is_s3(page_uri):
            root = self.root.rstrip("/") + "/"
            if not (is_s3(self.root) and page_uri.startswith(root) and split_s3(page_uri)[0] == split_s3(root)[0]):
                raise ConfigError(f"report {page_uri}: expected a place below the output root {self.root} "
                                  "(so that its links are relative), or a base URL for the output root")
            return "../" * page_uri[len(root):].count("/")
        rel = os.path.relpath(local_path(self.root), os.path.dirname(local_path(page_uri)))
        return "" if rel == "." else quote(rel.replace(os.sep, "/")) + "/"


def _origin(url: str | None) -> str | None:
    """``https://host[:port]`` of a base URL, for the page's Content-Security-Policy."""
    match = re.match(r"https?://[^/]+", url or "")
    return match.group(0) if match else None


def _href(prefix: str, path: str | None) -> str | None:
    return None if path is None else prefix + quote(path, safe="/")


@functools.lru_cache(maxsize=1)
def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("stylize.catalog", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["duration"] = _duration
    env.filters["when"] = _when
    env.filters["utilization"] = format_utilization
    env.filters["rate"] = lambda v: "-" if v is None else f"{v:,.0f}" if v >= 10 else f"{v:.2g}"
    return env


def _render_page(storage: Storage, pages: Pages, page: int, entries: list[Entry], context: dict,
                 *, last: bool, stats: Stats | None, total_pages: int | None) -> str:
    uri = pages.uri(page)
    prefix = pages.to_root(uri)
    for entry in entries:
        entry_links(entry, prefix)
    nav = {"page": page, "first": pages.href(page, 1), "prev": pages.href(page, page - 1) if page > 1 else None,
           "next": None if last else pages.href(page, page + 1), "total": total_pages,
           "all": [(k, pages.href(page, k)) for k in range(1, total_pages + 1)] if total_pages else None}
    html = _environment().get_template("report.html").render(
        **context, entries=entries, nav=nav, stats=stats, series=SERIES, width=CURVE_W, height=CURVE_H,
        pad=(_PAD_L, _PAD_R, _PAD_T, _PAD_B), page_href=lambda k: pages.href(page, k), version=__version__,
        csp_images=_origin(pages.base),
    )
    storage.write(uri, html.encode("utf-8"), content_type="text/html; charset=utf-8")
    return uri


def entry_links(entry: Entry, prefix: str) -> None:
    """Give ``entry`` the links its card uses, relative to its page (``prefix`` leads to the root)."""
    thumbs = entry.thumbs or {}
    entry.links = {
        "image": _href(prefix, entry.output),
        "output": _href(prefix, thumbs.get("output")),
        "content": _href(prefix, thumbs.get("content")),
        "styles": [_href(prefix, s) for s in thumbs.get("styles", ())],
    }


def write_report(storage: Storage, pages: Pages, entries: Iterable[Entry], context: dict,
                 *, expected: int | None = None) -> tuple[list[str], Stats]:
    """Write the pages for ``entries``, each page as it fills; the first page last, with the totals.

    ``expected`` (the number of jobs, when known beforehand) numbers the pages
    "k of n"; otherwise pages link to their neighbours and the first lists all.
    """
    stats = Stats()
    total_pages = max(1, math.ceil(expected / PAGE_SIZE)) if expected else None
    first: list[Entry] = []
    current: list[Entry] = []
    written: list[str] = []
    page = 1
    for index, entry in enumerate(entries):
        entry.index, entry.page = index, index // PAGE_SIZE + 1
        stats.add(entry)
        if entry.page > page:
            if page > 1:  # this page has a successor: write it now, and hold only the new one
                written.append(_render_page(storage, pages, page, current, context, last=False, stats=None,
                                            total_pages=total_pages))
            page, current = entry.page, []
        (first if entry.page == 1 else current).append(entry)
    if page > 1:
        written.append(_render_page(storage, pages, page, current, context, last=True, stats=None,
                                    total_pages=total_pages or page))
    total_pages = page if total_pages is None or total_pages < page else total_pages
    uri = _render_page(storage, pages, 1, first, context, last=page == 1, stats=stats, total_pages=total_pages)
    return [uri] + written, stats


# --- the two reports --------------------------------------------------------------------------


def build_run_report(storage: Storage, root: str, run_id: str, *, target: str | None = None,
                     base_url: str | None = None, summary: Mapping[str, Any] | None = None) -> Report:
    """Write the report of run ``run_id`` under ``root`` (default ``_runs/<run_id>.html``).

    ``summary`` is the run summary when the caller holds it (the flow, at the
    end of a run); otherwise it is read from ``_runs/<run_id>.json``.
    """
    if not runs.valid_run_id(run_id):
        raise ConfigError(f"run id {run_id!r}: expected letters, digits, '.', '_' or '-'")
    if summary is None:
        summary, why = runs.read_json(storage, runs.summary_uri(root, run_id))
        if summary is None:
            raise NotFoundError(f"{runs.summary_uri(root, run_id)}: no run summary ({why}); "
                                f"`stylize report {root}` lists the runs it finds")
    pages = Pages(target or runs.report_uri(root, run_id), root, base_url)
    problems = Problems()
    counts = summary.get("counts") if isinstance(summary.get("counts"), Mapping) else {}
    expected = counts.get("total") if _is_number(counts.get("total")) else None
    context = _context(f"Run {run_id}", root, [summary], problems, run=summary)
    if not storage.exists(runs.job_log_uri(root, run_id, 0)):
        # A run from before job logs: its summary still lists its failures.
        context["failures"] = Stats()
        _failures_from_summary(context["failures"], summary)
        context["no_job_log"] = True
    files = summary.get("job_log_files") if _is_number(summary.get("job_log_files")) else None
    uris, stats = write_report(storage, pages, run_entries(storage, root, run_id, problems, files), context,
                               expected=expected)
    return Report(uris[0], uris, stats.counts, len(problems))


def build_catalog_report(storage: Storage, root: str, *, target: str | None = None,
                         base_url: str | None = None) -> Report:
    """Write the report of every job with metadata under ``root`` and every run recorded there
    (default ``_runs/catalog.html``)."""
    pages = Pages(target or child(root, f"{runs.RUNS}/catalog.html"), root, base_url)
    problems = Problems()
    failures = Stats()  # the failures that runs recorded: a catalog's jobs are the ones with outputs
    summaries = []
    for summary in runs.list_runs(storage, root, problems):
        _failures_from_summary(failures, summary)
        summaries.append(_run_row(summary))  # without its failures: memory stays bounded per run
    summaries.sort(key=lambda s: s["started"], reverse=True)
    context = _context("Catalog", root, summaries, problems, run=None)
    context["failures"] = failures
    uris, stats = write_report(storage, pages, catalog_entries(storage, root, problems), context)
    return Report(uris[0], uris, stats.counts, len(problems))


def _run_row(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A run summary with the fields the runs table needs, whatever the file held."""
    row = {k: summary.get(k) for k in ("counts", "seconds", "engine_seconds", "devices")}
    row["started"] = str(summary.get("started") or "")
    row["run_id"] = str(summary.get("flow_run_id") or "")
    row["href"] = quote(row["run_id"]) + ".html" if runs.valid_run_id(row["run_id"]) else None
    return row


def _failures_from_summary(stats: Stats, summary: Mapping[str, Any]) -> None:
    for failure in summary.get("failures") or []:
        if isinstance(failure, Mapping):
            error = str(failure.get("error") or "unknown error")
            stats.add_failure(Entry(name=str(failure.get("job")), status="failed", error=error,
                                    kind=str(failure.get("kind") or "Error"), field=failure_field(error),
                                    run=str(summary.get("flow_run_id") or "")))


def _context(title: str, root: str, summaries: Sequence[Mapping[str, Any]], problems: Problems, *,
             run: Mapping[str, Any] | None) -> dict[str, Any]:
    """What every page shows besides its jobs. ``problems`` fills while the pages are built."""
    return {
        "title": title, "root": root, "run": run, "runs": summaries if run is None else [],
        "totals": run_totals(summaries), "problems": problems,
        "built": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "failures": None,
        "no_job_log": False,
    }
