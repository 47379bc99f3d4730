"""Deployments: the catalog flow served on a nightly schedule, and a parent flow over shards.

``serve_catalog`` registers ``stylize-catalog/<name>`` on the Prefect server
with a cron schedule and a deployment concurrency limit of 1, then executes its
runs on this machine until stopped (stopping pauses the schedule). A schedule
needs a real server: with ``PREFECT_API_URL`` unset, Prefect would start an
ephemeral API inside this process, which runs no scheduler, so no scheduled run
would ever be created.

``stylize_sharded`` (flow ``stylize-sharded``) is the way past one machine on a
work pool such as Kubernetes: it starts one run of a catalog deployment per
shard ``i/n`` through ``run_deployment`` (on the Kubernetes pool, one pod with
one GPU each), waits for all of them, and adds up their counts from the
summaries the shards write to ``OUTPUT/_runs/<flow-run-id>.json``. It waits,
rather than firing and forgetting, so that the night has one state (failed when
a shard failed) and so that its own deployment's concurrency limit of 1 keeps
one night's shards from overlapping the next night's.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.schedules import Cron, Schedule

from stylize.errors import ConfigError, NotFoundError, StylizeError
from stylize.catalog.manifest import storage_for
from stylize.catalog.storage import join

from .catalog import load, stylize_catalog

#: Every night at 02:00 (in the schedule's time zone).
NIGHTLY = "0 2 * * *"
#: The deployment name ``stylize serve`` uses unless told otherwise.
DEFAULT_NAME = "nightly"


def nightly_schedule(cron: str = NIGHTLY, timezone: str = "UTC") -> Schedule:
    """A cron schedule, checked the way the Prefect server checks it; errors name the bad part."""
    from pydantic import ValidationError
    from prefect.client.schemas.schedules import CronSchedule

    expected = {
        "cron": f"five cron fields, e.g. '{NIGHTLY}' for 02:00 every day",
        "timezone": "an IANA time zone name, e.g. UTC or Europe/Paris",
    }
    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        field = exc.errors()[0]["loc"][0]
        given = cron if field == "cron" else timezone
        raise ConfigError(f"schedule {field} {given!r} is invalid: expected {expected[field]}") from None
    return Cron(cron, timezone=timezone)


def require_server() -> str:
    """The URL of the Prefect server that deployments go to; ConfigError when none is set or it does not answer."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(
            "a schedule needs a Prefect server, and PREFECT_API_URL is not set: start one with "
            "`prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise ConfigError(
            f"the Prefect server at PREFECT_API_URL={url} does not answer ({type(error).__name__}: {error}); "
            "is `prefect server start` running there?"
        )
    return url


def serve_catalog(
    manifest: str,
    *,
    name: str = DEFAULT_NAME,
    schedule: Schedule | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> None:
    """Serve ``stylize-catalog/<name>`` for ``manifest`` from this process until interrupted.

    Registers the deployment with ``schedule`` (default: nightly at 02:00 UTC)
    and the catalog flow's other ``parameters`` (output, devices, workers,
    shard, max_failures, settings), then runs each of its flow runs, scheduled
    or triggered, in a subprocess here. At most one run goes at a time: a run
    that comes due while another is going waits for it (Prefect's ``ENQUEUE``
    strategy) instead of overlapping it; finished jobs are skipped, so the
    waiting run only does what is left.
    """
    require_server()
    stylize_catalog.serve(
        name=name,
        schedules=[schedule or nightly_schedule()],
        global_limit=1,
        parameters={"manifest": manifest, **(parameters or {})},
        description=f"stylize-catalog for {manifest}, served by `stylize serve`",
    )


class ShardsFailed(StylizeError):
    """Some shards of a sharded run failed, or more jobs failed than allowed."""

    def __init__(self, summary: dict[str, Any]):
        self.summary = summary
        bad = [f"{s['shard']} {s['state']}" for s in summary["shards"] if s["state"] != "Completed"]
        failed, allowed = summary["counts"]["failed"], summary["max_failures"]
        problems = [f"{len(bad)} of {len(summary['shards'])} shard(s) did not complete ({', '.join(bad)})"] if bad else []
        if failed > allowed:
            problems.append(f"{failed} job(s) failed, over the threshold of {allowed}")
        super().__init__(f"{summary['deployment']}: {'; '.join(problems)}; summaries under {summary['output']}/_runs/")


@task(name="run-shard", task_run_name="shard {shard}", cache_policy=NO_CACHE, persist_result=False)
def run_shard(deployment: str, parameters: dict[str, Any], shard: str, poll_seconds: float) -> FlowRun:
    """Start the catalog deployment's run for ``shard`` and wait until it ends."""
    return run_deployment(deployment, parameters={**parameters, "shard": shard}, poll_interval=poll_seconds)


@flow(name="stylize-sharded", log_prints=False, persist_result=False, validate_parameters=True)
def stylize_sharded(
    manifest: str,
    shards: int,
    deployment: str = "stylize-catalog/k8s-shard",
    output: str | None = None,
    max_failures: int = 0,
    settings: dict[str, Any] | None = None,
    poll_seconds: float = 15.0,
    allow_local: list[str] | None = None,
) -> dict[str, Any]:
    """Run ``manifest`` as ``shards`` runs of the catalog ``deployment`` at once, one per shard.

    Shard ``i`` runs with ``shard="i/shards"``, this run's ``manifest`` and
    ``max_failures``, and its ``output``, ``settings`` and ``allow_local`` when
    given (else the deployment's): an S3 manifest may name local paths only
    below ``allow_local``, as in the catalog flow. Waits for every shard, then returns each shard's state and
    counts and their sum. Fails when a shard did not complete or when more than
    ``max_failures`` jobs failed in all.
    """
    if shards < 1:
        raise ConfigError(f"shards must be at least 1, found {shards}")
    # A wrong deployment name or a bad manifest fails here, before any shard starts.
    _check_deployment(deployment)
    doc = load(manifest, allow_local)
    common = {"manifest": manifest, "max_failures": max_failures}
    common.update({k: v for k, v in (("output", output), ("settings", settings), ("allow_local", allow_local))
                   if v is not None})
    futures = [run_shard.submit(deployment, common, f"{i}/{shards}", poll_seconds) for i in range(shards)]
    runs = [future.result() for future in futures]

    storage = storage_for(doc)
    out_root = output or doc.output
    rows = [_shard_row(i, shards, run, storage, out_root) for i, run in enumerate(runs)]
    totals = {"done": 0, "skipped": 0, "failed": 0, "total": 0}
    for row in rows:
        for key in totals:
            totals[key] += (row["counts"] or {}).get(key, 0)
    summary = {
        "schema": "stylize.sharded/v1",
        "manifest": manifest,
        "deployment": deployment,
        "output": out_root,
        "shards": rows,
        "counts": totals,
        "max_failures": max_failures,
    }
    create_table_artifact(
        table=[{"shard": r["shard"], "state": r["state"], "flow_run": r["flow_run_id"], **(r["counts"] or {})}
               for r in rows],
        key="stylize-shards", description=f"Shards of {manifest} on {deployment}",
    )
    if any(r["state"] != "Completed" for r in rows) or totals["failed"] > max_failures:
        raise ShardsFailed(summary)
    return summary


def _check_deployment(name: str) -> None:
    """ConfigError unless ``name`` ("flow/deployment") is registered on the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    flow_name, _, deployment = name.partition("/")
    if not flow_name or not deployment:
        raise ConfigError(f"deployment {name!r}: expected 'flow/deployment', e.g. 'stylize-catalog/k8s-shard'")
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(
                f"deployment {name!r} is not registered on the Prefect server at {client.api_url}; "
                "register it first (`prefect deploy --all` registers prefect.yaml's k8s-shard)"
            ) from None


def _shard_row(i: int, n: int, run: FlowRun, storage, out_root: str) -> dict[str, Any]:
    """One shard's state and counts; counts are None when it wrote no summary (it crashed)."""
    uri = join(out_root, f"_runs/{run.id}.json")
    try:
        counts = json.loads(storage.read(uri))["counts"]
    except NotFoundError:
        counts = None
    state = run.state.name if run.state else "Unknown"
    return {"shard": f"{i}/{n}", "flow_run_id": str(run.id), "state": state, "counts": counts, "summary_uri": uri}
