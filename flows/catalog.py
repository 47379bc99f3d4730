"""The ``stylize-catalog`` flow: stylize every pair of a manifest, one task per group of jobs.

The flow expands the manifest lazily and groups its jobs into batches that
fill (``stylize.catalog.batching``): jobs that share styles and settings,
photos of one output shape first, then shapes that pad together with little
waste (sizes from the photos' headers; ``Engine.run_batch`` pads and masks),
looked for over the next ``LOOKAHEAD`` jobs, not in manifest order. It keeps at most
``max_in_flight`` jobs submitted and submits the next group as soon as one
finishes (``stylize.catalog.scheduling``: no barrier, so devices do not wait
for the slowest job of a window), so a catalog of 100,000 jobs holds a
bounded number of tasks and waiting jobs, and memory does not grow with the
jobs already finished. Each group of 1 to ``images_per_batch`` jobs is one
``stylize_jobs`` task: it takes a free device slot (on a Dask task runner:
the device of the worker that the scheduler chose, see ``flows/dask.py``),
reads and decodes its jobs, optimizes their images together (one VGG19 pass
for all), gives the device back and writes each job's outputs in a
``write_outputs`` task. A group of one is simply a small batch: there is one job path.

One retry policy, Prefect's: only transient storage errors are retried
(``retry_delay`` sets the backoff), on the task where they happen. A write
that fails is retried by its own task, so it never computes the image
again and never fails the rest of its group; a bad input fails its own job
and the others go on. When the run is interrupted (Ctrl+C, or SIGTERM,
which Prefect raises in the flow as ``TerminationSignal``) the running jobs
stop at their next iteration and no storage attempt starts after it
(``stop_storage``), so the process exits promptly with nothing half-written.

Progress goes out as typed events (``stylize.catalog.progress``: run
started, iteration, job finished) to whoever listens, the CLI's view when
there is one; the run ends with table, markdown, progress and link artifacts, a
summary JSON at ``OUTPUT/_runs/<flow-run-id>.json`` and its HTML report
beside it (``stylize.catalog.report``; the jobs' thumbnails and the run's
job log, ``stylize.catalog.runs``, are what it is built from).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import weakref
from collections import deque
from contextlib import nullcontext
from datetime import datetime, timezone
from typing import Any, Callable, Collection, Iterable, Iterator
from urllib.parse import quote

from prefect import Flow, flow, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.futures import PrefectFuture, as_completed
from prefect.tasks import exponential_backoff

from stylize.errors import Cancelled, ConfigError, StylizeError, TransientStorageError
from stylize.catalog.batching import group_jobs, header_shapes
from stylize.catalog.jobs import Outcome, Prepared, batch_key, finish, guarded, prepare
from stylize.catalog.manifest import Job, Manifest, in_shard, load_manifest, parse_shard, storage_for
from stylize.catalog.progress import Iteration, JobFinished, RunStarted, emit
from stylize.catalog.report import build_run_report
from stylize.catalog.runs import JobLog, device_utilization, format_utilization, report_uri
from stylize.catalog.scheduling import sliding_window
from stylize.catalog.storage import Storage, join, output_root
from stylize.catalog.thumbnails import output_thumb

from .dask import cluster_gpus, dask_client, dask_task_runner, job_resources, worker_device
from .devices import plan_devices, pool_for, runner_for

log = logging.getLogger(__name__)

#: Rows kept for the table artifact; the summary JSON keeps every failure.
TABLE_ROWS = 500


class CatalogFailed(StylizeError):
    """More jobs failed than the run's failure threshold allows."""

    def __init__(self, summary: dict[str, Any]):
        self.summary = summary
        counts = summary["counts"]
        super().__init__(
            f"{counts['failed']} job(s) failed, over the threshold of {summary['max_failures']}; "
            f"summary at {summary['summary_uri']}"
        )


def _transient_only(task, task_run, state) -> bool:
    """Retry a job only when it failed on a transient storage error."""
    try:
        state.result()
    except TransientStorageError:
        return True
    except Exception:
        return False
    return False


@task(name="load-manifest", retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=_transient_only, cache_policy=NO_CACHE, persist_result=False)
def load(manifest_uri: str, allow_local: list[str] | None = None) -> Manifest:
    """Read and validate the manifest (transient storage errors are retried)."""
    return load_manifest(manifest_uri, allow_local=allow_local)


@task(name="probe-output", retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=_transient_only, cache_policy=NO_CACHE, persist_result=False)
def probe_output(storage: Storage, root: str) -> None:
    """A tiny write and delete in the output root before any job: an output that cannot be
    written fails the run now, naming the root and the reason, not after the compute."""
    storage.probe(root)


#: Tries of a job's writes after the first (the write task's retries).
WRITE_RETRIES = 3


@task(name="write-outputs", task_run_name="write {prepared.job.name}", retries=WRITE_RETRIES,
      retry_delay_seconds=exponential_backoff(2), retry_jitter_factor=0.5,
      retry_condition_fn=_transient_only, cache_policy=NO_CACHE, persist_result=False)
def write_outputs(prepared: Prepared, result: Any, storage: Storage) -> Outcome:
    """Write one job's image, then its metadata. A task of its own, so that Prefect retries a
    transient storage error here without computing the image again, and a write that keeps
    failing fails this job alone, never the others of its group."""
    return guarded(prepared.job, prepared.started, lambda: finish(prepared, result, storage))


def _group_name() -> str:
    from prefect.runtime import task_run

    jobs = task_run.parameters["jobs"]
    return jobs[0].name if len(jobs) == 1 else f"{jobs[0].name} +{len(jobs) - 1}"


@task(name="stylize-jobs", task_run_name=_group_name, retries=3,
      retry_delay_seconds=exponential_backoff(2), retry_jitter_factor=0.5,
      retry_condition_fn=_transient_only, cache_policy=NO_CACHE, persist_result=False)
def stylize_jobs(jobs: list[Job], storage: Storage, slots: list[str] | None,
                 cancel: threading.Event | None = None, retry_delay: float = 2.0) -> list[Outcome]:
    """Run a group of 1 to N jobs that share styles and settings; one ``Outcome`` per job.

    Each job's reads and decoding happen before taking a device and its writes
    after giving it back, so the I/O of other groups overlaps the device's
    compute. The device is a free one of ``slots``, or with ``slots=None`` (on
    Dask) the worker's own. The jobs go through VGG19 together (photos of
    different shapes padded and masked), each with its own L-BFGS history
    (``Engine.run_batch``), so the pictures are the ones each job gives alone. Each job's writes are
    a ``write_outputs`` task with its own retries (after about ``retry_delay``
    x 1, 2 and 4 s). A transient storage error before the writes (reading
    inputs) retries this task. Setting ``cancel`` stops the optimization
    (``Cancelled``).
    """
    refuse_if_cancelled(cancel, jobs[0].name)  # a Prefect retry that comes due after an interrupt
    outcomes: list[Outcome] = []
    batches: dict[tuple, list[Prepared]] = {}
    for job in jobs:
        prepared = prepare(job, storage)
        if isinstance(prepared, Outcome):  # skipped, or unusable inputs
            outcomes.append(prepared)
        else:
            batches.setdefault(batch_key(prepared), []).append(prepared)
    write = write_outputs.with_options(retry_delay_seconds=exponential_backoff(retry_delay))
    for batch in batches.values():
        for prepared, result in zip(batch, _compute(batch, storage, slots, cancel)):
            outcomes.append(result if isinstance(result, Outcome) else _write(write, prepared, result, storage))
    return outcomes


def refuse_if_cancelled(cancel: threading.Event | None, name: str) -> None:
    """``Cancelled`` when the run was interrupted: a job (or its retry) starts no work, not even a read."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{name}: not started, the run was interrupted")


#: The stop events of this process's runs in progress, for ``stop_runs``.
_RUNNING: weakref.WeakSet[threading.Event] = weakref.WeakSet()


def stop_runs() -> None:
    """Stop every catalog run of this process now: their jobs stop at their next iteration and
    their storage sends nothing more. Called from another thread on Ctrl+C or SIGTERM (see
    ``stylize.app.interrupts``), before the main thread has unwound to the run's own
    ``stop.set()``."""
    for stop in list(_RUNNING):
        stop.set()


def _stop_event(dask) -> threading.Event | None:
    """The run's stop event, known to ``stop_runs``; None on Dask, where the cluster cancels its
    own tasks (an event is seen by this process's threads only)."""
    if dask is not None:
        return None
    stop = threading.Event()
    _RUNNING.add(stop)
    return stop


def stop_storage(storage: Storage, stop: threading.Event | None) -> Storage:
    """``storage``, refusing to send any request (first tries and botocore retries) once ``stop``
    is set; with ``stop=None`` (on Dask, where the cluster cancels its tasks) unchanged."""
    storage.cancel = stop
    return storage


def _report(prepared: Prepared, record) -> None:
    emit(Iteration(prepared.job.name, record, prepared.job.settings.iterations))


def _compute(batch: list[Prepared], storage: Storage, slots: list[str] | None,
             cancel: threading.Event | None) -> list:
    """Optimize ``batch`` on a device: a result per job, or its failed ``Outcome``. If the batch
    fails as a whole (one image's loss diverging, say), its jobs run one by one so that only the
    bad one fails."""
    with pool_for(slots).device() if slots else nullcontext(worker_device()) as device:
        runner = runner_for(device)
        step = lambda group: runner.compute_batch(group, _report, storage, cancel=cancel)  # noqa: E731
        if len(batch) == 1:
            return [guarded(batch[0].job, batch[0].started, lambda: step(batch)[0])]
        try:
            return step(batch)
        except (TransientStorageError, Cancelled):
            raise
        except StylizeError:
            return [guarded(p.job, p.started, lambda p=p: step([p])[0]) for p in batch]


def _write(write, prepared: Prepared, result, storage: Storage) -> Outcome:
    """Run the write task for one job; when its retries run out, the job fails with the last error."""
    state = write(prepared, result, storage, return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, Cancelled):
        raise outcome
    if isinstance(outcome, BaseException) or not isinstance(outcome, Outcome):
        log.info("job %s failed: %s", prepared.job.name, outcome)
        error = str(outcome) if isinstance(outcome, BaseException) else "its write task failed"
        return Outcome(prepared.job.name, "failed", time.perf_counter() - prepared.started, error=error)
    return outcome


def _batch_sizes(requested: int | None, slots: list[str] | None) -> int | Callable[[Job], int]:
    """Images per batch: the requested number, else per job what the first device's free memory
    allows at its settings (asked once per settings)."""
    if requested:
        return requested
    if not slots:
        return 1
    from stylize.engine.hardware import max_batch, resolve_device, resolve_precision

    device = resolve_device(slots[0])

    @functools.lru_cache(maxsize=64)
    def for_settings(s) -> int:
        return max_batch(device, s.size * s.size, resolve_precision(s.precision, device))

    return lambda job: for_settings(job.settings)


def _jobs(doc: Manifest, storage: Storage, settings, output, shard, clashes) -> Iterator[Job]:
    return (j for j in doc.jobs(storage, overrides=settings, output=output, clashes=clashes) if in_shard(j, shard))


@task(name="expand-manifest", retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=_transient_only, cache_policy=NO_CACHE, persist_result=False)
def count_jobs(doc: Manifest, storage: Storage, settings, output, shard) -> tuple[int, dict]:
    """Expand the whole manifest once before any work: every naming problem surfaces now, the
    name clashes are known (all their jobs fail, the others run), and the progress bar gets its
    total. Holds one listing page at a time, not the jobs."""
    return doc.survey(storage, overrides=settings, output=output, shard=shard)


class _Tally:
    """Counts and a bounded window of rows, so memory stays flat over 100,000 jobs; reports each
    outcome as a ``JobFinished`` event."""

    def __init__(self, total: int, log: JobLog | None = None):
        self.total = total  # jobs the run expects
        self.log = log  # every job's row, written to the run's job log as it goes
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.failures: list[dict[str, str]] = []
        self.rows: deque[dict[str, Any]] = deque(maxlen=TABLE_ROWS)
        self.engine_seconds = 0.0

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.status] += 1
        self.engine_seconds += outcome.engine_seconds
        if outcome.status == "failed":
            self.failures.append({"job": outcome.job, "error": outcome.error or "unknown error",
                                  "kind": outcome.kind or "Error"})
        self.rows.append(outcome.as_row())
        emit(JobFinished(outcome, self.finished, self.total))
        if self.log is not None:
            self.log.add(self.rows[-1])

    @property
    def finished(self) -> int:
        """Jobs done, skipped or failed so far."""
        return sum(self.counts.values())


@flow(name="stylize-catalog", log_prints=False, persist_result=False, validate_parameters=True)
def stylize_catalog(
    manifest: str,
    output: str | None = None,
    devices: list[str] | None = None,
    workers: int | None = None, max_failures: int = 0,
    shard: str | None = None,
    max_in_flight: int | None = None,
    settings: dict[str, Any] | None = None,
    images_per_batch: int | None = None,
    retry_delay: float = 2.0, allow_local: list[str] | None = None,
) -> dict[str, Any]:
    """Stylize every job of ``manifest`` (a local path or s3:// URI).

    ``output`` replaces the manifest's output root; ``devices`` (e.g.
    ``["cuda:0", "cuda:1"]`` or ``["cpu"]``) and ``workers`` choose the device
    slots (default: every GPU, else one CPU worker); ``shard="i/n"`` runs the
    i-th of n disjoint parts; ``settings`` overrides engine settings for every
    job. Two sizes, not to be confused: ``max_in_flight`` jobs are in flight
    (default 4 per device slot, at least 16; the next group goes as soon as
    one finishes), and up to ``images_per_batch`` jobs sharing styles and
    settings are optimized together in one VGG19 pass, padded (default:
    on the CPU 2 in float32 and 1 in bf16, from free memory on CUDA). A
    transient storage error is retried 3 times, after about ``retry_delay``
    x 1, 2 and 4 s (jittered): a read by rerunning its group's task, a write
    by rerunning only the writes. On Dask (``catalog_on_dask``) each job runs on a
    worker's GPU, and ``devices``/``workers`` are refused. Fails after every
    job has finished when more than ``max_failures`` failed. Returns the run summary. An S3
    manifest may name local paths only below ``allow_local`` (none for `watch` and Lambda runs).
    """
    started, began = time.perf_counter(), datetime.now(timezone.utc)
    shard_spec = parse_shard(shard) if shard else None
    dask = dask_client()
    slots = _device_slots(devices, workers, dask)
    slot_count = len(slots) if slots else cluster_gpus(dask)
    in_flight = max_in_flight or max(16, 4 * slot_count)
    stop = _stop_event(dask)
    doc = load(manifest, allow_local)
    storage = stop_storage(storage_for(doc), stop)
    probe_output(storage, output_root(output or doc.output))
    total, clashes = count_jobs(doc, storage, settings, output, shard_spec)
    emit(RunStarted(total))
    tally = _Tally(total, JobLog(storage, output_root(output or doc.output), str(get_run_context().flow_run.id)))
    try:
        _run_jobs(_jobs(doc, storage, settings, output, shard_spec, clashes), storage, tally,
                  in_flight=in_flight, images_per_batch=images_per_batch, slots=slots,
                  on_dask=dask is not None, stop=stop, retry_delay=retry_delay)
    except BaseException:
        # Interrupted or failing: stop the running jobs at their next iteration, or the
        # task runner's shutdown would wait for each of them to finish.
        if stop is not None:
            stop.set()
        raise

    summary = _summary(tally, manifest, output or doc.output, shard, slots or [f"dask {dask.scheduler.address}"],
                       slot_count, max_failures, began, time.perf_counter() - started)
    _publish(summary, tally, storage)
    if tally.counts["failed"] > max_failures:
        raise CatalogFailed(summary)
    return summary


def _device_slots(devices: list[str] | None, workers: int | None, dask) -> list[str] | None:
    """This process's device slots; None on Dask, where each job runs on its worker's device."""
    if dask is None:
        return plan_devices(devices, workers)
    if devices or workers:
        raise ConfigError(
            "devices and workers choose device slots in the flow's own process; on Dask each job runs on "
            "its worker's GPU, so size the cluster instead"
        )
    return None


def _run_jobs(jobs: Iterable[Job], storage: Storage, tally: "_Tally", *, in_flight: int,
             images_per_batch: int | None, slots: list[str] | None, on_dask: bool,
             stop: threading.Event | None, retry_delay: float) -> None:
    """Group the jobs into batches that fill (``group_jobs``: same styles and settings, photos whose
    shapes fill ``MIN_FILL`` of their padded batch, over a look-ahead of ``LOOKAHEAD`` jobs), keep
    ``in_flight`` jobs submitted and
    submit the next group as soon as one finishes (``sliding_window``: no barrier); tally each
    outcome as its group finishes."""
    progress_id = create_progress_artifact(progress=0.0, description="Jobs finished in this run")
    run = stylize_jobs.with_options(retry_delay_seconds=exponential_backoff(retry_delay))
    groups = group_jobs(jobs, _batch_sizes(images_per_batch, slots), shape_of=header_shapes(storage))

    def submit(group: list[Job]):
        with job_resources() if on_dask else nullcontext():
            return run.submit(group, storage, slots, cancel=stop, retry_delay=retry_delay)

    shown = time.monotonic()
    for future, group in sliding_window(groups, in_flight, submit, _first_done):
        result = future.result(raise_on_failure=False)
        if not isinstance(result, list):  # the task raised: retries exhausted
            message = str(result) if isinstance(result, BaseException) else "task failed"
            result = [Outcome(job.name, "failed", error=message) for job in group]
        for outcome in result:
            tally.add(outcome)
        if time.monotonic() - shown >= PROGRESS_EVERY:
            update_progress_artifact(progress_id, progress=100.0 * tally.finished / max(tally.total, 1))
            shown = time.monotonic()
    update_progress_artifact(progress_id, progress=100.0)


#: Seconds between updates of the progress artifact (one API call each).
PROGRESS_EVERY = 2.0


def _first_done(futures: Collection[PrefectFuture]) -> PrefectFuture:
    """The first of ``futures`` to finish (one already finished, if any)."""
    return next(as_completed(list(futures)))


def catalog_on_dask(address: str = "local", *, n_workers: int | None = None) -> Flow:
    """``stylize-catalog`` with its jobs on the Dask cluster at ``address``, or ``"local"``
    (see ``flows.dask.dask_task_runner``)."""
    return stylize_catalog.with_options(task_runner=dask_task_runner(address, n_workers=n_workers))


def _summary(tally: _Tally, manifest: str, output: str, shard, slots, slot_count: int, max_failures, began,
             seconds) -> dict:
    run_id = str(get_run_context().flow_run.id)
    return {
        "schema": "stylize.run/v1",
        "flow_run_id": run_id,
        "manifest": manifest,
        "output": output,
        "shard": shard,
        "devices": slots,
        "started": began.isoformat(),
        "seconds": round(seconds, 3),
        "engine_seconds": round(tally.engine_seconds, 3),
        "device_slots": slot_count,
        "device_utilization": device_utilization(tally.engine_seconds, seconds * slot_count),
        "counts": dict(tally.counts, total=tally.finished),
        "max_failures": max_failures,
        "failures": tally.failures,
        "summary_uri": join(output, f"_runs/{run_id}.json"),
    }


def _publish(summary: dict, tally: _Tally, storage: Storage) -> None:
    tally.log.flush()
    summary["job_log_files"] = tally.log.files
    summary["report_uri"] = report_uri(output_root(summary["output"]), summary["flow_run_id"])
    storage.write(summary["summary_uri"], json.dumps(summary, indent=2).encode(), content_type="application/json")
    thumbs = _publish_report(summary, tally, storage)
    rows = list(tally.rows)
    create_table_artifact(
        table=rows, key="stylize-jobs",
        description=f"Jobs of this run (last {len(rows)} of {tally.finished})",
    )
    c = summary["counts"]
    lines = [
        f"# stylize-catalog: {c['done']} done, {c['skipped']} skipped, {c['failed']} failed",
        "",
        f"- manifest: `{summary['manifest']}`",
        f"- output: `{summary['output']}`",
        f"- devices: {', '.join(summary['devices'])}",
        f"- wall time: {summary['seconds']:.1f} s (engine {summary['engine_seconds']:.1f} s, "
        f"device utilization {format_utilization(summary['device_utilization'])})",
        f"- summary: `{summary['summary_uri']}`",
    ]
    if tally.failures:
        lines += ["", "## Failures", ""] + [f"- **{f['job']}**: {f['error']}" for f in tally.failures[:100]]
    if thumbs:
        lines += ["", "## First outputs", ""] + [f"![{name.replace('[', '(').replace(']', ')')}]({url})"
                                                   for name, url in thumbs]
    create_markdown_artifact(markdown="\n".join(lines), key="stylize-summary", description="Run totals")


#: Thumbnails shown in the markdown artifact when the output is served over HTTP(S).
ARTIFACT_THUMBNAILS = 8


def _publish_report(summary: dict, tally: _Tally, storage: Storage) -> list[tuple[str, str]]:
    """Write ``_runs/<id>.html`` and link it as an artifact; returns (job, thumbnail URL) pairs
    for the markdown summary when ``STYLIZE_OUTPUT_URL`` says where the output is served."""
    root, run_id = output_root(summary["output"]), summary["flow_run_id"]
    try:
        report = build_run_report(storage, root, run_id, summary=summary)
    except Exception as exc:  # noqa: BLE001 - the outputs and summary are written: the run stands without a report
        log.warning("the report of run %s was not written: %s: %s", run_id, type(exc).__name__, exc)
        return []
    served = os.environ.get("STYLIZE_OUTPUT_URL", "").rstrip("/")
    served = served if served.startswith(("http://", "https://")) else ""
    link = f"{served}/_runs/{run_id}.html" if served else report.uri if "://" in report.uri else f"file://{report.uri}"
    create_link_artifact(link=link, link_text=f"report: {summary['counts']['done']} done, "
                         f"{summary['counts']['failed']} failed", key="stylize-report",
                         description="Thumbnails, loss curves, failures and timings of this run")
    done = [row["job"] for row in tally.rows if row["status"] == "done"][:ARTIFACT_THUMBNAILS]
    return [(name, f"{served}/{quote(output_thumb(name))}") for name in done] if served else []
