"""The `stylize` process around a run: a failed run is quiet (a table, no traceback), an interrupt
ends it within 10 s even while an S3 request hangs, and kill -9 leaves no child process behind.
Each test runs the command as a child process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import boto3
import pytest
from faults import FaultProxy, cli_env, descendants, interrupt, kill, start_run, survivors, wait_until

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent.parent / "data"
FAST = {"size": 32, "iterations": 2, "scales": 1, "precision": "float32"}
ROOT = Path(__file__).parent.parent.parent


def manifest(folder: Path, output: str, pairs: list[tuple[str, str]], settings: dict = FAST,
             storage: str = "") -> Path:
    shutil.copy(DATA / "chelsea.png", folder / "cat.png")
    shutil.copy(DATA / "starry_night.jpg", folder / "starry.jpg")
    path = folder / "manifest.yaml"
    lines = "\n".join(f"  - {{content: {c}, style: {s}}}" for c, s in pairs)
    path.write_text(f"version: 1\noutput: {output}\n{storage}\ndefaults: {json.dumps(settings)}\npairs:\n{lines}\n")
    return path


def test_a_run_with_failed_jobs_prints_its_table_and_no_traceback(tmp_path):
    from prefect.client.orchestration import get_client

    path = manifest(tmp_path, "out", [("cat.png", "starry.jpg"), ("missing.png", "starry.jpg"),
                                      ("cat.png", "gone.jpg")])
    run = subprocess.run([sys.executable, "-m", "stylize.app.cli", "run", str(path), "--quiet"], cwd=ROOT,
                         env=cli_env(tmp_path / "prefect"), capture_output=True, text=True, timeout=240)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "CatalogFailed" not in run.stderr, run.stderr
    failed = {line.split(":")[0]: line for line in run.stdout.splitlines() if line.startswith("failed ")}
    assert sorted(failed) == ["failed cat__gone", "failed missing__starry"], run.stdout  # one line each
    assert failed["failed missing__starry"].endswith("missing.png: no such file")
    assert failed["failed cat__gone"].endswith("gone.jpg: no such file")
    assert "┃ done ┃ skipped ┃ failed ┃" in run.stdout

    # Prefect still records the flow run as failed.
    [summary] = (tmp_path / "out" / "_runs").glob("*.json")
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(json.loads(summary.read_text())["flow_run_id"]).state
    assert state.is_failed() and "2 job(s) failed" in state.message


@pytest.mark.parametrize("scenario, sig", [("hung", signal.SIGINT), ("retrying", signal.SIGTERM)])
def test_an_interrupt_during_a_stalled_upload_ends_the_run_within_10_s(scenario, sig, s3_server, bucket, tmp_path):
    # hung: the first image upload stalls for two minutes; botocore waits out its 60 s read timeout,
    # then retries (5 times), and Prefect retries the task: Ctrl+C took 365 s before this change.
    # retrying: every image upload stalls, and a 1 s read timeout makes botocore retry every few
    # seconds: after the interrupt, none of those retries may start.
    timeouts = {"hung": "", "retrying": ", read_timeout: 1, connect_timeout: 1"}[scenario]
    storage = f'storage: {{{{endpoint_url: "{{}}", region: us-east-1{timeouts}}}}}'
    with FaultProxy(s3_server, kinds=("stall",), methods=("PUT",), path=r"/out/[^/_][^/]*\.png$",
                    limit=1 if scenario == "hung" else None, stall_seconds=120) as proxy:
        path = manifest(tmp_path, f"s3://{bucket}/out", [("cat.png", "starry.jpg")],
                        storage=storage.format(proxy.url))
        log = tmp_path / "run.log"
        process = start_run(path, cli_env(tmp_path / "prefect"), log=log)
        try:
            proxy.wait_for_fault(1 if scenario == "hung" else 2, timeout=240)  # retrying: in botocore's retries
        finally:
            interrupt(process, sig, proxy, log)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_the_manifest_read_hangs_ends_the_run_within_10_s(sig, s3_server, s3, bucket, tmp_path):
    # Before the flow starts, `stylize run` reads the manifest in its main thread: a GET that hangs
    # there must not hold the process either (nor be retried by botocore after the signal).
    s3.put_object(Bucket=bucket, Key="manifests/m.yaml", Body=b"version: 1\noutput: out\npairs: []\n")
    with FaultProxy(s3_server, kinds=("stall",), methods=("GET",), path=r"/manifests/m\.yaml",
                    stall_seconds=120) as proxy:
        log = tmp_path / "run.log"
        process = start_run(f"s3://{bucket}/manifests/m.yaml",
                            cli_env(tmp_path / "prefect", AWS_ENDPOINT_URL=proxy.url), log=log)
        try:
            proxy.wait_for_fault(timeout=120)
        finally:
            interrupt(process, sig, proxy, log)


def environment_without_api(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A child environment with no PREFECT_API_URL: the command starts its own temporary server."""
    env = cli_env(tmp_path / "prefect", **extra)
    env.pop("PREFECT_API_URL", None)
    return env


def start_watch_run(tmp_path: Path, s3, bucket: str, s3_server: str) -> tuple[subprocess.Popen, Callable]:
    """``stylize watch`` (in-process runs, its own temporary API) whose queue holds a new manifest's
    notification (real, from the S3 server); returns it and a test that its run is under way."""
    sqs = boto3.session.Session().client("sqs", endpoint_url=s3_server, region_name="us-east-1")
    queue = sqs.create_queue(QueueName=f"stylize-{uuid.uuid4().hex[:12]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [
        {"QueueArn": arn, "Events": ["s3:ObjectCreated:*"],
         "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "manifests/"}]}}}]})
    s3.put_object(Bucket=bucket, Key="in/cat.png", Body=(DATA / "chelsea.png").read_bytes())
    s3.put_object(Bucket=bucket, Key="in/starry.jpg", Body=(DATA / "starry_night.jpg").read_bytes())
    body = {"version": 1, "output": f"s3://{bucket}/out", "defaults": dict(FAST, iterations=5000, save_every=1),
            "storage": {"endpoint_url": s3_server, "region": "us-east-1"},
            "pairs": [{"content": f"s3://{bucket}/in/cat.png", "style": f"s3://{bucket}/in/starry.jpg"}]}
    s3.put_object(Bucket=bucket, Key="manifests/long.yaml", Body=json.dumps(body).encode())  # JSON is YAML
    log = open(tmp_path / "run.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "stylize.app.cli", "watch", "--queue-url", queue, "--manifest-prefix",
         f"s3://{bucket}/manifests/", "--state-dir", str(tmp_path / "state"), "--wait-seconds", "1"],
        cwd=ROOT, env=environment_without_api(tmp_path, AWS_ENDPOINT_URL=s3_server),
        stdout=log, stderr=subprocess.STDOUT)
    log.close()

    def under_way() -> bool:  # its temporary API and a run that has written a snapshot
        listing = s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])
        return bool(descendants(process.pid)) and any(".iter" in o["Key"] for o in listing)

    return process, under_way


@pytest.mark.parametrize("command", ["run", "run --dask local", "watch"])
def test_kill_9_leaves_no_child_process(command, s3_server, s3, bucket, tmp_path):
    if command.startswith("run"):
        # Under way (a snapshot per iteration shows it) and long enough to be killed mid-job. With
        # --dask local the children are also a Dask worker and multiprocessing's resource tracker.
        path = manifest(tmp_path, "out", [("cat.png", "starry.jpg")],
                        settings=dict(FAST, iterations=5000, save_every=1))
        dask = ["--dask", "local", "--workers", "1"] if "dask" in command else []
        process = start_run(path, environment_without_api(tmp_path), *dask, log=tmp_path / "run.log")
        under_way = lambda: descendants(process.pid) and any((tmp_path / "out").glob("*.iter*.png"))  # noqa: E731
    else:  # killed in the middle of a run that a notification started
        process, under_way = start_watch_run(tmp_path, s3, bucket, s3_server)
    children: set[tuple[int, int]] = set()
    try:
        wait_until(under_way, 240, f"stylize {command} to start its children", process)
        children = descendants(process.pid)
        kill(process, signal.SIGKILL)
        deadline = time.monotonic() + 10  # the kernel's signal is immediate; give them time to die
        while survivors(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not survivors(children), f"still running after kill -9 of stylize {command}: {survivors(children)}"
    finally:
        if process.poll() is None:
            process.kill()
        for pid, _ in survivors(children):  # do not leave them to the next test
            os.kill(pid, signal.SIGKILL)
