"""The watcher end to end: real S3 notifications from the loopback S3 server to its SQS queue,
runs started in-process or through the test Prefect API, and the Lambda handler against that API."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
from faults import FaultProxy, cli_env, interrupt, wait_until

from flows.catalog import stylize_catalog
from flows.watch import DeploymentRuns, InProcessRuns, RunNotFinished, Watcher, check_standing_manifest
from stylize.app.cli import main
from stylize.errors import ConfigError, PrefectApiError
from stylize.app.aws_lambda import handler
from stylize.catalog.events import ObjectEvent, Routes, RunLedger

DATA = Path(__file__).parent.parent / "data"
FAST = {"size": 32, "iterations": 2, "scales": 1, "precision": "float32"}

pytestmark = pytest.mark.slow


@pytest.fixture
def sqs(s3_server):
    return boto3.session.Session().client("sqs", endpoint_url=s3_server, region_name="us-east-1")


@pytest.fixture
def env(s3_server, monkeypatch):
    """Plain ``Storage()`` (which reads the manifests) talks to the loopback server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)


def notify(s3, sqs, bucket: str, visibility: int = 30, prefix: str | None = None) -> str:
    """A fresh queue that receives the bucket's ObjectCreated notifications (only for keys under
    ``prefix``, if given); returns its URL. A received message comes back after ``visibility``
    seconds unless deleted."""
    url = sqs.create_queue(QueueName=f"stylize-{uuid.uuid4().hex[:12]}",
                           Attributes={"VisibilityTimeout": str(visibility)})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    config = {"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}
    if prefix is not None:
        config["Filter"] = {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={
        "QueueConfigurations": [config]})
    return url


def in_queue(sqs, url: str) -> int:
    """Messages still in the queue, visible or not."""
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def peek(sqs, url: str, key: str) -> str:
    """The body of the notification for ``key``, left in the queue."""
    reply = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0)
    bodies = [m["Body"] for m in reply.get("Messages", []) if key in m["Body"].replace("%2F", "/")]
    assert len(bodies) == 1, reply
    return bodies[0]


def put(s3, bucket: str, key: str, body: bytes) -> ObjectEvent:
    etag = s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')
    return ObjectEvent(bucket, key, etag)


def put_manifest(s3, bucket, endpoint, key: str, output: str, **block) -> ObjectEvent:
    body = {"version": 1, "output": f"s3://{bucket}/{output}", "defaults": FAST,
            "storage": {"endpoint_url": endpoint, "region": "us-east-1"}, **block}
    return put(s3, bucket, key, json.dumps(body).encode())  # JSON is YAML


def put_inputs(s3, bucket, image_bytes, photos=("cat",)) -> None:
    put(s3, bucket, "styles/starry.jpg", (DATA / "starry_night.jpg").read_bytes())
    for i, name in enumerate(photos):
        put(s3, bucket, f"photos/{name}.png", image_bytes("png", size=(32, 24), color=(40 * i % 256, 90, 200)))


def cat_pair(bucket: str) -> list[dict]:
    return [{"content": f"s3://{bucket}/photos/cat.png", "style": f"s3://{bucket}/styles/starry.jpg"}]


def summaries(s3, bucket: str, output: str) -> list[dict]:
    """The run summaries under an output root: one per flow run that ran."""
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"{output}/_runs/").get("Contents", [])
    return [json.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()) for o in listing
            if o["Key"].endswith(".json") and "/" not in o["Key"][len(f"{output}/_runs/"):]]  # not the job logs


def watcher(queue, sqs, routes, runs, **options) -> Watcher:
    options = {"debounce": 1.0, "wait_seconds": 1, "retry_after": 0, **options}
    return Watcher(queue, routes, runs, sqs=sqs, **options)


# --- in-process -------------------------------------------------------------------


def test_manifest_upload_starts_one_run_redelivery_none_garbage_dropped(
        s3, sqs, bucket, s3_server, env, image_bytes, tmp_path, caplog):
    put_inputs(s3, bucket, image_bytes)
    queue = notify(s3, sqs, bucket)
    routes = Routes(manifest_prefix=f"s3://{bucket}/manifests/")
    w = watcher(queue, sqs, routes, InProcessRuns(RunLedger(str(tmp_path / "state" / "started.sqlite3"))))
    pairs = cat_pair(bucket)

    # (a) A new manifest starts exactly one run, which writes the outputs.
    put_manifest(s3, bucket, s3_server, "manifests/one.yaml", "out", pairs=pairs)
    body = peek(sqs, queue, "manifests/one.yaml")
    w.run(until_idle=True, max_polls=10)
    [summary] = summaries(s3, bucket, "out")
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 0, "total": 1}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert {"out/cat__starry.png", "out/cat__starry.json"} <= keys
    assert in_queue(sqs, queue) == 0  # the manifest's notification and the S3 test event

    # (b) The same notification delivered again starts nothing and is deleted.
    sqs.send_message(QueueUrl=queue, MessageBody=body)
    w.run(until_idle=True, max_polls=10)
    assert len(summaries(s3, bucket, "out")) == 1
    assert in_queue(sqs, queue) == 0

    # (d) Garbage is logged and dropped, an invalid manifest fails its own run (and is not
    # retried: a retry would not fix it), and the watcher goes on to the next manifest.
    no_object = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put"}]}
    for garbage in ("not json", '{"hello": 1}', json.dumps(no_object)):
        sqs.send_message(QueueUrl=queue, MessageBody=garbage)
    put(s3, bucket, "manifests/broken.yaml", b"version: 2\n")
    put_manifest(s3, bucket, s3_server, "manifests/two.yaml", "out", pairs=pairs)
    with caplog.at_level(logging.INFO, logger="stylize.watch"):
        w.run(until_idle=True, max_polls=10)
    assert in_queue(sqs, queue) == 0
    runs = summaries(s3, bucket, "out")
    assert sorted(s["counts"]["skipped"] for s in runs) == [0, 1]  # two.yaml ran; its job was finished
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "expected JSON" in logged and "found keys: hello" in logged and "s3: missing" in logged
    assert "broken.yaml" in logged and "ended FAILED" in logged


def test_images_within_the_debounce_window_start_one_incremental_run(
        s3, sqs, bucket, s3_server, env, image_bytes, tmp_path):
    # A standing catalog, run once before the watcher starts: 2 photos x 1 style, finished.
    put_inputs(s3, bucket, image_bytes, photos=("old-0", "old-1"))
    standing = put_manifest(s3, bucket, s3_server, "manifests/catalog.yaml", "out/catalog", grid={
        "contents": [f"s3://{bucket}/photos/"], "styles": [f"s3://{bucket}/styles/starry.jpg"]}).uri
    first = stylize_catalog(manifest=standing)
    assert first["counts"]["done"] == 2

    queue = notify(s3, sqs, bucket)
    routes = Routes(images_prefix=f"s3://{bucket}/photos/", standing_manifest=standing)
    check_standing_manifest(routes)
    for i in range(20):
        put(s3, bucket, f"photos/new-{i:02d}.png", image_bytes("png", size=(32, 24), color=(i * 12, 30, 90)))

    w = watcher(queue, sqs, routes, InProcessRuns(RunLedger(str(tmp_path / "started.sqlite3"))))
    w.run(until_idle=True, max_polls=20)

    runs = summaries(s3, bucket, "out/catalog")
    assert len(runs) == 2  # the first run and exactly one more
    [incremental] = [s for s in runs if s["flow_run_id"] != first["flow_run_id"]]
    assert incremental["counts"] == {"done": 20, "skipped": 2, "failed": 0, "total": 22}
    pngs = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/catalog/")["Contents"]
            if o["Key"].endswith(".png")]
    assert len(pngs) == 22
    assert in_queue(sqs, queue) == 0


def test_standing_manifest_writing_under_the_images_prefix_is_refused(s3, bucket, s3_server, env):
    # A grid of named photos lists no folder, so only the images prefix makes this a loop (a grid
    # over photos/ is refused as the manifest loads: see test_careless_runs.py).
    standing = put_manifest(s3, bucket, s3_server, "manifests/catalog.yaml", "photos/out", grid={
        "contents": [f"s3://{bucket}/photos/a.png"], "styles": [f"s3://{bucket}/styles/starry.jpg"]}).uri
    with pytest.raises(ConfigError, match="would start new runs on themselves"):
        check_standing_manifest(Routes(images_prefix=f"s3://{bucket}/photos/", standing_manifest=standing))


def poll_until(w: Watcher, condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        w.poll_once()


def test_image_messages_stay_while_the_standing_manifest_cannot_run_and_retries_back_off(
        s3, sqs, bucket, s3_server, env, image_bytes, tmp_path, caplog):
    put_inputs(s3, bucket, image_bytes, photos=())
    grid = {"contents": [f"s3://{bucket}/photos/"], "styles": [f"s3://{bucket}/styles/starry.jpg"]}
    standing = put_manifest(s3, bucket, s3_server, "manifests/catalog.yaml", "out/catalog", grid=grid).uri
    routes = Routes(images_prefix=f"s3://{bucket}/photos/", standing_manifest=standing)
    check_standing_manifest(routes)  # valid when the watcher starts...
    queue = notify(s3, sqs, bucket)
    w = watcher(queue, sqs, routes, InProcessRuns(RunLedger(str(tmp_path / "started.sqlite3"))),
                debounce=0, retry_after=1)

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("not starting the run")]

    # ...then edited into an invalid one, and a photo arrives: nothing runs, the message stays.
    put(s3, bucket, "manifests/catalog.yaml", b"version: 2\n")
    put(s3, bucket, "photos/new.png", image_bytes("png", size=(32, 24), color=(10, 200, 30)))
    with caplog.at_level(logging.DEBUG, logger="stylize.watch"):
        poll_until(w, lambda: len(refusals()) == 2, 10, "two refusals")
        # Edited again: now it writes under the images prefix, which looped (38 runs in 150 s).
        put_manifest(s3, bucket, s3_server, "manifests/catalog.yaml", "photos/styled", grid=grid)
        poll_until(w, lambda: len(refusals()) == 3, 10, "a third refusal")
        assert in_queue(sqs, queue) == 1 and summaries(s3, bucket, "photos/styled") == []
        # Fixed: the kept message comes back once more and its photo is stylized.
        put_manifest(s3, bucket, s3_server, "manifests/catalog.yaml", "out/catalog", grid=grid)
        poll_until(w, lambda: in_queue(sqs, queue) == 0, 30, "the photo's run")
    first, again, other = refusals()
    # Each problem is logged once as a warning; the repeat of the first only at debug level.
    assert [r.levelno for r in (first, again, other)] == [logging.WARNING, logging.DEBUG, logging.WARNING]
    assert "version" in first.getMessage()
    # Refused as it loads: its output lies where its grid lists photos (which feeds runs, too).
    assert "photos/styled (output) lies in" in other.getMessage() and "grid.contents[0]" in other.getMessage()
    # The waits double (1 s, then 2 s), so a manifest broken for a day costs a read every 15 min.
    assert again.created - first.created >= 0.9 and other.created - again.created >= 1.9
    [run] = summaries(s3, bucket, "out/catalog")
    assert run["counts"] == {"done": 1, "skipped": 0, "failed": 0, "total": 1}
    assert "out/catalog/new__starry.png" in {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}


def test_an_image_run_that_stops_short_frees_its_key_and_raises(s3, bucket, s3_server, env, tmp_path):
    # In-process, a standing manifest that fails as the run starts (edited after the watcher's check)
    # is no verdict on the images: the run raises, so the watcher keeps the messages, and the key is free.
    put(s3, bucket, "manifests/catalog.yaml", b"version: 2\n")
    ledger = RunLedger(str(tmp_path / "started.sqlite3"))
    routes = Routes(images_prefix=f"s3://{bucket}/photos/", standing_manifest=f"s3://{bucket}/manifests/catalog.yaml")
    request = routes.images_run([ObjectEvent(bucket, "photos/a.png", "e1")])
    with pytest.raises(RunNotFinished, match="ended FAILED before its jobs ran"):
        InProcessRuns(ledger).start(request)
    assert ledger.claim(request)  # free again: a redelivery runs it


@pytest.mark.parametrize("kind", ["manifest", "images"])
def test_a_run_that_stops_short_keeps_its_messages_until_a_run_covers_them(
        kind, s3, sqs, bucket, s3_server, env, image_bytes, tmp_path, monkeypatch):
    # The run computes and writes its job, then cannot write its summary (S3 answers 503, and
    # max_attempts 0 means no botocore retry): it stopped short, so its notification stays.
    put_inputs(s3, bucket, image_bytes, photos=())
    # Only the watched keys notify: the run's own writes would crowd the queue we count.
    queue = notify(s3, sqs, bucket, prefix="manifests/" if kind == "manifest" else "photos/")
    ledger = RunLedger(str(tmp_path / "started.sqlite3"))
    with FaultProxy(s3_server, kinds=("503",), methods=("PUT",), path=r"/out/_runs/[^/]+\.json$") as proxy:
        # The runs read their manifests through the proxy too: a manifest read from S3 may name
        # only the endpoint it was read from.
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage = {"endpoint_url": proxy.url, "region": "us-east-1", "max_attempts": 0}
        if kind == "manifest":
            put(s3, bucket, "photos/cat.png", image_bytes("png", size=(32, 24), color=(40, 90, 200)))
            routes = Routes(manifest_prefix=f"s3://{bucket}/manifests/")
            put_manifest(s3, bucket, s3_server, "manifests/one.yaml", "out", pairs=cat_pair(bucket), storage=storage)
        else:
            grid = {"contents": [f"s3://{bucket}/photos/"], "styles": [f"s3://{bucket}/styles/starry.jpg"]}
            standing = put_manifest(s3, bucket, s3_server, "manifests/catalog.yaml", "out", grid=grid,
                                    storage=storage).uri
            routes = Routes(images_prefix=f"s3://{bucket}/photos/", standing_manifest=standing)
            put(s3, bucket, "photos/cat.png", image_bytes("png", size=(32, 24), color=(40, 90, 200)))
        w = watcher(queue, sqs, routes, InProcessRuns(ledger), debounce=0, retry_after=1)
        poll_until(w, lambda: proxy.faults, 240, "the first run to stop short")  # a run is one poll
        assert in_queue(sqs, queue) == 1  # kept: SQS delivers it again
        assert summaries(s3, bucket, "out") == []
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
        assert {"out/cat__starry.png", "out/cat__starry.json"} <= keys  # the job itself went through

        proxy.rate = 0  # S3 is back: the redelivered notification runs again and is deleted
        poll_until(w, lambda: in_queue(sqs, queue) == 0, 240, "the redelivered notification's run")
    [run] = summaries(s3, bucket, "out")
    assert run["counts"] == {"done": 0, "skipped": 1, "failed": 0, "total": 1}
    assert len(proxy.faults) == 1  # one failed summary write, and one run that stopped short


def start_watch(queue: str, bucket: str, state: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``stylize watch`` of the bucket's manifests, in-process runs, as a child process."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stylize.app.cli", "watch", "--queue-url", queue, "--manifest-prefix",
             f"s3://{bucket}/manifests/", "--state-dir", str(state), "--wait-seconds", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent.parent)


def s3_through(proxy: FaultProxy, s3_server: str, tmp_path: Path) -> dict[str, str]:
    """The watcher's environment: S3 (the manifest too, which may name only the endpoint it was read
    from) through the proxy, SQS straight to the server."""
    return cli_env(tmp_path / "prefect", AWS_ENDPOINT_URL=s3_server, AWS_ENDPOINT_URL_S3=proxy.url)


def started_keys(ledger: Path) -> list:
    with sqlite3.connect(ledger) as db:
        return db.execute("SELECT key FROM started").fetchall()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_during_a_stalled_upload_frees_the_key_so_the_redelivered_message_runs(
        sig, s3, sqs, bucket, s3_server, env, image_bytes, tmp_path, monkeypatch):
    put_inputs(s3, bucket, image_bytes)
    queue = notify(s3, sqs, bucket, visibility=2, prefix="manifests/")
    ledger = tmp_path / "state" / "started-runs.sqlite3"
    log = tmp_path / "watch.log"
    # The watcher's run stalls on its first image upload; the signal arrives while it hangs (the
    # watchdog ends the process, freeing the key first: unwinding would wait on the hung PUT).
    with FaultProxy(s3_server, kinds=("stall",), methods=("PUT",), path=r"/out/[^/_][^/]*\.png$", limit=1,
                    stall_seconds=120) as proxy:
        put_manifest(s3, bucket, proxy.url, "manifests/one.yaml", "out", pairs=cat_pair(bucket))
        process = start_watch(queue, bucket, ledger.parent, s3_through(proxy, s3_server, tmp_path),
                              log)
        try:
            proxy.wait_for_fault(timeout=240)
        finally:
            interrupt(process, sig, proxy, log)
        assert started_keys(ledger) == []  # the key was freed
        assert in_queue(sqs, queue) == 1  # and the message kept

        # SQS delivers it again (after 2 s here) to a new watcher, and this time the run goes through.
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        w = watcher(queue, sqs, Routes(manifest_prefix=f"s3://{bucket}/manifests/"),
                    InProcessRuns(RunLedger(str(ledger))))
        poll_until(w, lambda: in_queue(sqs, queue) == 0, 120, "the redelivered message's run")
    [run] = summaries(s3, bucket, "out")
    assert run["counts"] == {"done": 1, "skipped": 0, "failed": 0, "total": 1}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert {"out/cat__starry.png", "out/cat__starry.json"} <= keys


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_while_computing_frees_the_key_and_keeps_the_message(
        sig, s3, sqs, bucket, s3_server, env, image_bytes, tmp_path):
    # Here nothing hangs: the run unwinds (Prefect's own SIGTERM handler is in place during a
    # flow run), the job stops at its next iteration, and the key is freed on the way out.
    put_inputs(s3, bucket, image_bytes)
    queue = notify(s3, sqs, bucket, prefix="manifests/")
    ledger = tmp_path / "state" / "started-runs.sqlite3"
    log = tmp_path / "watch.log"
    with FaultProxy(s3_server, rate=0) as proxy:  # no faults: it records the run's requests
        put_manifest(s3, bucket, proxy.url, "manifests/long.yaml", "out", pairs=cat_pair(bucket),
                     defaults=dict(FAST, iterations=5000, save_every=1))
        process = start_watch(queue, bucket, ledger.parent, s3_through(proxy, s3_server, tmp_path),
                              log)
        try:
            wait_until(lambda: any(".iter" in path for _, _, path in proxy.seen), 240,
                       "the run's first snapshot", process)
            assert len(started_keys(ledger)) == 1
        finally:
            interrupt(process, sig, proxy, log, on_the_wire=1)  # a snapshot's HEAD and PUT each iteration
    assert started_keys(ledger) == []
    assert in_queue(sqs, queue) == 1
    assert summaries(s3, bucket, "out") == []


# --- through the Prefect API -------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment():
    """A deployment of the catalog flow in the test API (no worker: its runs stay scheduled)."""
    deployment_id = stylize_catalog.to_deployment(name="watch-test").apply()
    return "stylize-catalog/watch-test", deployment_id


def flow_runs(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def test_deployment_runs_are_created_once_and_survive_an_api_outage(
        s3, sqs, bucket, s3_server, env, image_bytes, deployment):
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    name, deployment_id = deployment
    before = {r.id for r in flow_runs(deployment_id)}
    put_inputs(s3, bucket, image_bytes)
    # The watcher reads the standing manifest before each image run, in deployment mode too.
    standing = put_manifest(s3, bucket, s3_server, "manifests/catalog.yaml", "out/catalog", grid={
        "contents": [f"s3://{bucket}/photos/"], "styles": [f"s3://{bucket}/styles/starry.jpg"]}).uri
    queue = notify(s3, sqs, bucket)
    routes = Routes(manifest_prefix=f"s3://{bucket}/manifests/", images_prefix=f"s3://{bucket}/photos/",
                    standing_manifest=standing)
    runs = DeploymentRuns(name)
    runs.check()
    w = watcher(queue, sqs, routes, runs)

    def new_runs():
        return [r for r in flow_runs(deployment_id) if r.id not in before]

    manifest = put_manifest(s3, bucket, s3_server, "manifests/one.yaml", "out", pairs=cat_pair(bucket))
    body = peek(sqs, queue, "manifests/one.yaml")
    w.run(until_idle=True, max_polls=10)
    [run] = new_runs()
    assert run.idempotency_key == routes.manifest_run(manifest).idempotency_key
    assert run.parameters["manifest"] == manifest.uri
    assert run.state.is_scheduled()

    sqs.send_message(QueueUrl=queue, MessageBody=body)  # redelivered: Prefect returns the same run
    w.run(until_idle=True, max_polls=10)
    assert len(new_runs()) == 1
    assert in_queue(sqs, queue) == 0

    images = [put(s3, bucket, f"photos/new-{i}.png", image_bytes("png", color=(i, 2, 3))) for i in range(3)]
    w.run(until_idle=True, max_polls=10)
    batch = [r for r in new_runs() if r.parameters["manifest"] == standing]
    assert [r.idempotency_key for r in batch] == [routes.images_run(images).idempotency_key]

    # The API goes away: the run cannot start, the message stays; once it is back, the run starts.
    later = put_manifest(s3, bucket, s3_server, "manifests/two.yaml", "out", pairs=cat_pair(bucket))
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 0}):
        w.poll_once()
    assert in_queue(sqs, queue) == 1
    assert len(new_runs()) == 2
    w.run(until_idle=True, max_polls=10)
    assert in_queue(sqs, queue) == 0
    assert routes.manifest_run(later).idempotency_key in {r.idempotency_key for r in new_runs()}


def test_watch_with_a_deployment_and_no_api_configured_says_so(tmp_path):
    # Without PREFECT_API_URL Prefect would start a temporary server, which holds no deployments.
    env = cli_env(tmp_path / "prefect")
    env.pop("PREFECT_API_URL", None)
    run = subprocess.run([sys.executable, "-m", "stylize.app.cli", "watch", "--queue-url", "http://127.0.0.1:9/1/q",
                          "--manifest-prefix", "s3://b/m/", "--deployment", "stylize-catalog/nightly"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent.parent)
    assert run.returncode == 2, run.stderr
    assert "PREFECT_API_URL is not set" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--manifest-prefix", "s3://b/m/", "--deployment", "stylize-catalog/nope"], "no such deployment"),
    (["--manifest-prefix", "s3://b/m/", "--deployment", "nope"], "expected 'flow name/deployment name'"),
    (["--images-prefix", "s3://b/p/"], "--images-prefix needs --standing-manifest"),
    (["--manifest-prefix", "s3://b/m/", "--wait-seconds", "30"], "--wait-seconds: expected 0 to 20"),
])
def test_watch_command_refuses_bad_settings_before_polling(args, message, tmp_path, capsys):
    assert main(["watch", "--queue-url", "http://127.0.0.1:9/1/q", "--state-dir", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_lambda_handler_starts_runs_through_the_rest_api(s3, sqs, bucket, s3_server, image_bytes, deployment,
                                                         monkeypatch):
    from prefect.settings import PREFECT_API_URL

    name, deployment_id = deployment
    queue = notify(s3, sqs, bucket)
    manifest = put_manifest(s3, bucket, s3_server, "manifests/lambda.yaml", "out", pairs=cat_pair(bucket))
    images = [put(s3, bucket, f"photos/l-{i}.png", image_bytes("png", color=(9, i, 9))) for i in range(2)]
    reply = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)
    # An SQS batch handed to Lambda, carrying the real notifications (and the S3 test event).
    event = {"Records": [{"eventSource": "aws:sqs", "messageId": m["MessageId"], "body": m["Body"]}
                         for m in reply["Messages"]]}
    assert len(event["Records"]) == 4

    standing = f"s3://{bucket}/manifests/catalog.yaml"
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    monkeypatch.setenv("STYLIZE_DEPLOYMENT", name)
    monkeypatch.setenv("STYLIZE_MANIFEST_PREFIX", f"s3://{bucket}/manifests/")
    monkeypatch.setenv("STYLIZE_IMAGES_PREFIX", f"s3://{bucket}/photos/")
    monkeypatch.setenv("STYLIZE_STANDING_MANIFEST", standing)

    first = handler(event, None)
    assert [s["manifest"] for s in first["started"]] == [manifest.uri, standing]
    assert first["existing"] == [] and len(first["skipped"]) == 1  # the test event
    second = handler(event, None)  # redelivered: the same runs, none new
    assert second["started"] == []
    assert [s["flow_run_id"] for s in second["existing"]] == [s["flow_run_id"] for s in first["started"]]

    routes = Routes(manifest_prefix=f"s3://{bucket}/manifests/", images_prefix=f"s3://{bucket}/photos/",
                    standing_manifest=standing)
    by_id = {str(r.id): r for r in flow_runs(deployment_id)}
    keys = [by_id[s["flow_run_id"]].idempotency_key for s in first["started"]]
    assert keys == [routes.manifest_run(manifest).idempotency_key, routes.images_run(images).idempotency_key]

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with pytest.raises(PrefectApiError, match="cannot reach the Prefect API"):  # Lambda retries the event
        handler(event, None)
