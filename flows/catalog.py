"""The ``stylize-catalog`` flow: stylize every pair of a manifest, one task per job.

The flow expands the manifest lazily and submits jobs in batches, so a
catalog of 100,000 jobs never has more than one batch of tasks in flight and
memory does not grow with the jobs already finished. Each task takes a free
device slot (on a Dask task runner: the device of the worker that the
scheduler chose, see ``flows/dask.py``), runs one job through the library's
``JobRunner`` (read, skip if complete, stylize, write image then metadata) and
returns a small ``Outcome``. Only transient storage errors are retried
(``retry_delay`` sets the backoff); a bad input fails its own job and the
others go on. When the run is interrupted (Ctrl+C, or SIGTERM, which Prefect
raises in the flow as ``TerminationSignal``) the running jobs stop at their
next iteration and no storage attempt starts after it (``stop_storage``), so
the process exits promptly with nothing half-written.

Progress goes to the ``stylize.app.view`` logger (the CLI draws it), and the
run ends with table, markdown and progress artifacts and a summary JSON at
``OUTPUT/_runs/<flow-run-id>.json``.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from contextlib import nullcontext
from datetime import datetime, timezone
from itertools import islice
from typing import Any, Iterable, Iterator

from prefect import Flow, flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.futures import as_completed
from prefect.tasks import exponential_backoff

from stylize.errors import Cancelled, ConfigError, StylizeError, TransientStorageError
from stylize.catalog.jobs import Outcome, batch_key, finish, guarded, prepare
from stylize.catalog.manifest import Job, Manifest, in_shard, load_manifest, parse_shard, storage_for
from stylize.catalog.storage import Storage, join

from .dask import cluster_gpus, dask_client, dask_task_runner, job_resources, worker_device
from .devices import plan_devices, pool_for, runner_for

log = logging.getLogger(__name__)
progress_log = logging.getLogger("stylize.app.view")

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
def load(manifest_uri: str) -> Manifest:
    """Read and validate the manifest (transient storage errors are retried)."""
    return load_manifest(manifest_uri)


@task(name="stylize-job", task_run_name="{job.name}", retries=3,
      retry_delay_seconds=exponential_backoff(2), retry_jitter_factor=0.5,
      retry_condition_fn=_transient_only, cache_policy=NO_CACHE, persist_result=False)
def stylize_job(job: Job, storage: Storage, slots: list[str] | None,
                cancel: threading.Event | None = None) -> Outcome:
    """Run one job: its reads and decoding before taking a device, its writes after
    giving it back, so I/O of other jobs overlaps the device's compute. The device is
    a free one of ``slots``, or with ``slots=None`` (on Dask) the worker's own.
    Setting ``cancel`` stops the optimization (``Cancelled``)."""
    refuse_if_cancelled(cancel, job.name)  # a Prefect retry that comes due after an interrupt
    prepared = prepare(job, storage)
    if isinstance(prepared, Outcome):  # skipped, or unusable inputs
        return prepared

    def report(record):  # per-iteration progress for the CLI
        progress_log.debug("iteration", extra={"job": job.name, "record": record})

    with pool_for(slots).device() if slots else nullcontext(worker_device()) as device:
        result = guarded(job, prepared.started,
                         lambda: runner_for(device).compute(prepared, report, storage, cancel=cancel))
    if isinstance(result, Outcome):
        return result
    return guarded(job, prepared.started, lambda: finish(prepared, result, storage))


@task(name="stylize-batch", task_run_name="{jobs[0].name} +{n_more}", retries=3,
      retry_delay_seconds=exponential_backoff(2), retry_jitter_factor=0.5,
      retry_condition_fn=_transient_only, cache_policy=NO_CACHE, persist_result=False)
def stylize_batch(jobs: list[Job], storage: Storage, slots: list[str] | None, n_more: int = 0,
                  cancel: threading.Event | None = None, retry_delay: float = 2.0) -> list[Outcome]:
    """Run jobs that share styles and settings as optimization batches on one device.

    Jobs whose images also share a size go through VGG19 together, each with
    its own L-BFGS history (``Engine.run_batch``), so the pictures are the
    ones each job gives alone. If a batch fails as a whole (one image's loss
    diverging, say), its jobs run one by one so that only the bad one fails.
    Each job's writes are retried on their own (``finish_alone``), so that a
    key that cannot be written fails its job only, and a storage hiccup does
    not make the whole batch compute again.
    """
    refuse_if_cancelled(cancel, jobs[0].name)  # a Prefect retry that comes due after an interrupt
    outcomes: list[Outcome] = []
    groups: dict[tuple, list] = {}
    for job in jobs:
        prepared = prepare(job, storage)
        if isinstance(prepared, Outcome):
            outcomes.append(prepared)
        else:
            groups.setdefault(batch_key(prepared), []).append(prepared)

    def report(prepared, record):  # per-iteration progress for the CLI
        progress_log.debug("iteration", extra={"job": prepared.job.name, "record": record})

    for group in groups.values():
        with pool_for(slots).device() if slots else nullcontext(worker_device()) as device:
            runner = runner_for(device)
            try:
                results = runner.compute_batch(group, report, storage, cancel=cancel)
            except (TransientStorageError, Cancelled):
                raise
            except StylizeError:
                results = [guarded(p.job, p.started,
                                   lambda p=p: runner.compute_batch([p], report, storage, cancel=cancel)[0])
                           for p in group]
        for prepared, result in zip(group, results):
            outcomes.append(result if isinstance(result, Outcome)
                            else finish_alone(prepared, result, storage, retry_delay, cancel))
    return outcomes


def refuse_if_cancelled(cancel: threading.Event | None, name: str) -> None:
    """``Cancelled`` when the run was interrupted: a job (or its retry) starts no work, not even a read."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{name}: not started, the run was interrupted")


def stop_storage(storage: Storage, stop: threading.Event | None) -> Storage:
    """``storage``, refusing to send any request (first tries and botocore retries) once ``stop``
    is set; with ``stop=None`` (on Dask, where the cluster cancels its tasks) unchanged."""
    storage.cancel = stop
    return storage


#: Tries of a batched job's writes after the first, as the tasks' retries.
WRITE_RETRIES = 3


def finish_alone(prepared, result, storage: Storage, retry_delay: float,
                 cancel: threading.Event | None = None) -> Outcome:
    """Write one batched job's outputs, retrying transient storage errors like a task would
    (``WRITE_RETRIES`` more tries, after about ``retry_delay`` x 1, 2 and 4 s, jittered);
    when they run out, the job fails with the last error and its batch-mates are unaffected."""
    job = prepared.job
    delays = iter(exponential_backoff(retry_delay)(WRITE_RETRIES))  # the tasks' own schedule
    while True:
        try:
            return guarded(job, prepared.started, lambda: finish(prepared, result, storage))
        except TransientStorageError as exc:
            delay = next(delays, None)
            if delay is None:
                log.info("job %s failed: %s", job.name, exc)
                return Outcome(job.name, "failed", time.perf_counter() - prepared.started, error=str(exc))
            delay *= 1 + 0.5 * random.random()  # jittered as the tasks' retry_jitter_factor=0.5
            log.info("job %s: %s; writing again in %.1f s", job.name, exc, delay)
            stopped = cancel.wait(delay) if cancel is not None else time.sleep(delay)
            if stopped:
                raise Cancelled(f"{job.name}: interrupted before its outputs were written") from exc


def _groups(jobs: list[Job], per_batch: int) -> list[list[Job]]:
    """Split a window of jobs into groups of up to ``per_batch`` sharing styles and settings."""
    by_key: dict[tuple, list[Job]] = {}
    for job in jobs:
        by_key.setdefault((job.styles, job.settings), []).append(job)
    return [same[i:i + per_batch] for same in by_key.values() for i in range(0, len(same), per_batch)]


def _images_per_batch(requested: int | None, slots: list[str] | None, jobs: list[Job]) -> int:
    """The requested batch size, else what the first device's free memory allows for these jobs."""
    if requested:
        return requested
    if not slots or not jobs:
        return 1
    from stylize.engine.optimize import max_batch, resolve_device, resolve_precision

    device = resolve_device(slots[0])
    s = next((j.settings for j in jobs if j.settings is not None), None)  # refused jobs have none
    if s is None:
        return 1
    return max_batch(device, s.size * s.size, resolve_precision(s.precision, device))


def _jobs(doc: Manifest, storage: Storage, settings, output, shard) -> Iterator[Job]:
    return (j for j in doc.jobs(storage, overrides=settings, output=output) if in_shard(j, shard))


@task(name="expand-manifest", retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=_transient_only, cache_policy=NO_CACHE, persist_result=False)
def count_jobs(doc: Manifest, storage: Storage, settings, output, shard) -> int:
    """Expand the whole manifest once before any work: every naming problem surfaces now, and
    the progress bar gets its total. Holds one listing page at a time, not the jobs."""
    return sum(1 for _ in _jobs(doc, storage, settings, output, shard))


def _batches(jobs: Iterable[Job], size: int) -> Iterator[list[Job]]:
    it = iter(jobs)
    while batch := list(islice(it, size)):
        yield batch


class _Tally:
    """Counts and a bounded window of rows, so memory stays flat over 100,000 jobs."""

    def __init__(self):
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.failures: list[dict[str, str]] = []
        self.rows: deque[dict[str, Any]] = deque(maxlen=TABLE_ROWS)
        self.engine_seconds = 0.0

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.status] += 1
        self.engine_seconds += outcome.engine_seconds
        if outcome.status == "failed":
            self.failures.append({"job": outcome.job, "error": outcome.error or "unknown error"})
        self.rows.append(outcome.as_row())

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@flow(name="stylize-catalog", log_prints=False, persist_result=False, validate_parameters=True)
def stylize_catalog(
    manifest: str,
    output: str | None = None,
    devices: list[str] | None = None,
    workers: int | None = None,
    max_failures: int = 0,
    shard: str | None = None,
    batch_size: int | None = None,
    settings: dict[str, Any] | None = None,
    images_per_batch: int | None = None,
    retry_delay: float = 2.0,
) -> dict[str, Any]:
    """Stylize every job of ``manifest`` (a local path or s3:// URI).

    ``output`` replaces the manifest's output root; ``devices`` (e.g.
    ``["cuda:0", "cuda:1"]`` or ``["cpu"]``) and ``workers`` choose the device
    slots (default: every GPU, else one CPU worker); ``shard="i/n"`` runs the
    i-th of n disjoint parts; ``settings`` overrides engine settings for every
    job. ``images_per_batch`` optimizes up to that many same-size jobs sharing
    styles and settings together on one device (default: on the CPU 2 in
    float32 and 1 in bf16, from free memory on CUDA). A job that fails on a
    transient storage error is retried 3 times, after about ``retry_delay`` x
    1, 2 and 4 seconds (jittered).
    With a Dask task runner (``catalog_on_dask``) each job runs
    on a worker's GPU instead, and ``devices``/``workers`` are refused. Fails
    after every job has finished when more than ``max_failures`` jobs failed.
    Returns the run summary.
    """
    started = time.perf_counter()
    began = datetime.now(timezone.utc)
    shard_spec = parse_shard(shard) if shard else None
    dask = dask_client()
    if dask is not None and (devices or workers):
        raise ConfigError(
            "devices and workers choose device slots in the flow's own process; on Dask each job runs on "
            "its worker's GPU, so size the cluster instead"
        )
    slots = plan_devices(devices, workers) if dask is None else None
    batch = batch_size or max(16, 4 * (len(slots) if slots else cluster_gpus(dask)))
    # Threads of this process see the event; on Dask the cluster cancels its own tasks.
    stop = threading.Event() if dask is None else None
    doc = load(manifest)
    storage = stop_storage(storage_for(doc), stop)
    out_root = output or doc.output
    total = count_jobs(doc, storage, settings, output, shard_spec)
    progress_log.info("start", extra={"total": total})
    progress_id = create_progress_artifact(progress=0.0, description="Jobs finished in this run")
    tally = _Tally()
    backoff = exponential_backoff(retry_delay)
    one, several = (t.with_options(retry_delay_seconds=backoff) for t in (stylize_job, stylize_batch))

    try:
        for group in _batches(_jobs(doc, storage, settings, output, shard_spec), batch):
            batches = _groups(group, _images_per_batch(images_per_batch, slots, group))
            with job_resources() if dask is not None else nullcontext():
                futures = [one.submit(jobs[0], storage, slots, cancel=stop) if len(jobs) == 1
                           else several.submit(jobs, storage, slots, n_more=len(jobs) - 1, cancel=stop,
                                               retry_delay=retry_delay)
                           for jobs in batches]
            names = {f.task_run_id: [j.name for j in jobs] for f, jobs in zip(futures, batches)}
            for future in as_completed(futures):
                result = future.result(raise_on_failure=False)
                if isinstance(result, Outcome):
                    result = [result]
                elif not isinstance(result, list):  # the task raised: retries exhausted
                    message = str(result) if isinstance(result, BaseException) else "task failed"
                    result = [Outcome(name, "failed", error=message) for name in names[future.task_run_id]]
                for outcome in result:
                    tally.add(outcome)
                    progress_log.info("job", extra={"outcome": outcome, "finished": tally.total})
            del futures, names, batches
            update_progress_artifact(progress_id, progress=100.0 * tally.total / max(total, 1))
    except BaseException:
        # Interrupted or failing: stop the running jobs at their next iteration, or the
        # task runner's shutdown would wait for each of them to finish.
        if stop is not None:
            stop.set()
        raise

    update_progress_artifact(progress_id, progress=100.0)
    where = slots or [f"dask {dask.scheduler.address}"]
    summary = _summary(tally, manifest, out_root, shard, where, max_failures, began, time.perf_counter() - started)
    _publish(summary, tally, storage)
    if tally.counts["failed"] > max_failures:
        raise CatalogFailed(summary)
    return summary


def catalog_on_dask(address: str = "local", *, n_workers: int | None = None) -> Flow:
    """``stylize-catalog`` with its jobs on the Dask cluster at ``address``, or ``"local"``
    (see ``flows.dask.dask_task_runner``)."""
    return stylize_catalog.with_options(task_runner=dask_task_runner(address, n_workers=n_workers))


def _summary(tally: _Tally, manifest: str, output: str, shard, slots, max_failures, began, seconds) -> dict:
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
        "counts": dict(tally.counts, total=tally.total),
        "max_failures": max_failures,
        "failures": tally.failures,
        "summary_uri": join(output, f"_runs/{run_id}.json"),
    }


def _publish(summary: dict, tally: _Tally, storage: Storage) -> None:
    storage.write(summary["summary_uri"], json.dumps(summary, indent=2).encode(), content_type="application/json")
    rows = list(tally.rows)
    create_table_artifact(
        table=rows, key="stylize-jobs",
        description=f"Jobs of this run (last {len(rows)} of {tally.total})",
    )
    c = summary["counts"]
    lines = [
        f"# stylize-catalog: {c['done']} done, {c['skipped']} skipped, {c['failed']} failed",
        "",
        f"- manifest: `{summary['manifest']}`",
        f"- output: `{summary['output']}`",
        f"- devices: {', '.join(summary['devices'])}",
        f"- wall time: {summary['seconds']:.1f} s (engine {summary['engine_seconds']:.1f} s)",
        f"- summary: `{summary['summary_uri']}`",
    ]
    if tally.failures:
        lines += ["", "## Failures", ""] + [f"- **{f['job']}**: {f['error']}" for f in tally.failures[:100]]
    create_markdown_artifact(markdown="\n".join(lines), key="stylize-summary", description="Run totals")
