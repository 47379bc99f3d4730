"""`stylize serve`, the sharded parent flow and prefect.yaml against a real Prefect server on loopback.

The module starts `prefect server start` on 127.0.0.1 with its own PREFECT_HOME
(so its own SQLite database), serves a small catalog with `stylize serve` in a
subprocess, and talks to both through the Prefect client. The session's
`prefect_test_harness` API is left alone: every call here names this server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.templating import apply_values

from flows.deploy import ShardsFailed, stylize_sharded
from stylize.app.cli import main
from stylize.errors import ConfigError

ROOT = Path(__file__).parent.parent.parent
DATA = ROOT / "tests" / "data"
FAST = {"size": 32, "iterations": 2, "scales": 1, "precision": "float32"}
DEPLOYMENT = "stylize-catalog/test-nightly"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(home: Path, **settings: str) -> dict[str, str]:
    """This environment without any PREFECT_* variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", **settings)
    return env


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (a graceful shutdown for Prefect), then SIGKILL if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """URL (``http://127.0.0.1:PORT/api``) of a Prefect server of our own, with its own database."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    log = home / "server.log"
    env = prefect_env(home, PREFECT_UI_ENABLED="false",
                      # A run that waits for the deployment's concurrency slot retries after 1 s, not 30.
                      PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="1")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Prefect server did not come up on port {port}:\n{tail(log)}")
            time.sleep(0.5)
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    """2 photos x 1 painting: 2 jobs."""
    root = tmp_path_factory.mktemp("catalog")
    (root / "photos").mkdir()
    shutil.copy(DATA / "chelsea.png", root / "photos" / "cat.png")
    shutil.copy(DATA / "astronaut.png", root / "photos" / "astronaut.png")
    shutil.copy(DATA / "starry_night.jpg", root)
    manifest = root / "manifest.yaml"
    manifest.write_text(f"version: 1\noutput: out\ndefaults: {json.dumps(FAST)}\n"
                        "grid: {contents: [photos/], styles: [starry_night.jpg]}\n")
    return manifest


@pytest.fixture(scope="module")
def served(server, catalog, tmp_path_factory):
    """`stylize serve` in a subprocess, once its deployment exists; yields the output folder it was given."""
    home = tmp_path_factory.mktemp("prefect-serve")
    out = catalog.parent / "served"
    log = home / "serve.log"
    command = [sys.executable, "-m", "stylize.app.cli", "serve", str(catalog), "--name", "test-nightly",
               "--cron", "30 3 * * 1-5", "--timezone", "Europe/Paris", "--output", str(out),
               "--iterations", "1", "--max-failures", "1"]
    env = prefect_env(home, PREFECT_API_URL=server, PREFECT_RUNNER_POLL_FREQUENCY="1")
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.read_deployment_by_name(DEPLOYMENT)
                    break
                except ObjectNotFound:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"`stylize serve` registered no deployment:\n{tail(log)}")
                time.sleep(0.5)
        yield out
    finally:
        stop(process)


def test_serve_registers_a_scheduled_deployment_that_runs_here(served, server, catalog):
    with temporary_settings({PREFECT_API_URL: server}):
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(DEPLOYMENT)
        [schedule] = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == \
            ("30 3 * * 1-5", "Europe/Paris", True)
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.parameters == {"manifest": str(catalog), "output": str(served), "max_failures": 1,
                                         "settings": {"iterations": 1}}
        assert deployment.entrypoint == "flows/catalog.py:stylize_catalog"

        run = run_deployment(DEPLOYMENT, timeout=240, poll_interval=1)
    assert run.state.is_completed(), run.state
    names = {f"{c}__starry_night" for c in ("cat", "astronaut")}
    found = {p.name for p in served.iterdir() if p.is_file()}
    assert found == {f"{n}.png" for n in names} | {f"{n}.json" for n in names}
    meta = json.loads((served / "cat__starry_night.json").read_text())
    assert meta["losses"]["iteration"] == [0, 1]  # the served --iterations 1
    summary = json.loads((served / "_runs" / f"{run.id}.json").read_text())
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 0, "total": 2}


def test_sharded_parent_runs_one_deployment_run_per_shard(served, server, catalog):
    out = catalog.parent / "sharded"
    with temporary_settings({PREFECT_API_URL: server}):
        summary = stylize_sharded(manifest=str(catalog), shards=2, deployment=DEPLOYMENT,
                                  output=str(out), poll_seconds=1, allow_local=[str(catalog.parent)])
        with get_client(sync_client=True) as client:
            runs = [client.read_flow_run(s["flow_run_id"]) for s in summary["shards"]]

    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 0, "total": 2}
    assert [(s["shard"], s["state"], s["counts"]["done"]) for s in summary["shards"]] == \
        [("0/2", "Completed", 1), ("1/2", "Completed", 1)]
    assert [r.parameters["shard"] for r in runs] == ["0/2", "1/2"]
    assert all(r.parameters["output"] == str(out) for r in runs)
    assert all(r.parameters["allow_local"] == [str(catalog.parent)] for r in runs)  # what S3 manifests may read
    assert len(list(out.glob("*.png"))) == 2
    # The served deployment allows one run at a time, so its two shards took turns.
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert first.end_time <= second.start_time


def test_sharded_parent_fails_naming_the_failed_shards(served, server, catalog):
    bad = catalog.parent / "bad.yaml"
    (catalog.parent / "broken").mkdir()
    (catalog.parent / "broken" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad.write_text(f"version: 1\noutput: out\ndefaults: {json.dumps(FAST)}\n"
                   "pairs: [{content: broken/corrupt.png, style: starry_night.jpg}]\n")
    out = catalog.parent / "failing"
    with temporary_settings({PREFECT_API_URL: server}):
        with pytest.raises(ShardsFailed) as failed:
            stylize_sharded(manifest=str(bad), shards=1, deployment=DEPLOYMENT, output=str(out), poll_seconds=1)
        assert str(failed.value) == (f"{DEPLOYMENT}: 1 of 1 shard(s) did not complete (0/1 Failed); "
                                     f"1 job(s) failed, over the threshold of 0; summaries under {out}/_runs/")
        assert failed.value.summary["shards"][0]["counts"]["failed"] == 1

        # Nothing starts when the deployment does not exist or the count is wrong.
        with pytest.raises(ConfigError, match="'stylize-catalog/missing' is not registered on the Prefect server"):
            stylize_sharded(manifest=str(catalog), shards=2, deployment="stylize-catalog/missing")
        with pytest.raises(ConfigError, match="expected 'flow/deployment'"):
            stylize_sharded(manifest=str(catalog), shards=2, deployment="k8s-shard")
        with pytest.raises(ConfigError, match="shards must be at least 1, found 0"):
            stylize_sharded(manifest=str(catalog), shards=0, deployment=DEPLOYMENT)
    assert not (out / "corrupt__starry_night.png").exists()


def test_prefect_yaml_deploys_to_its_work_pools(server, tmp_path):
    env = prefect_env(tmp_path, PREFECT_API_URL=server)

    def prefect(*args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"

    # The commands the README gives, verbatim.
    prefect("work-pool", "create", "stylize-gpu", "--type", "process")
    prefect("work-pool", "create", "stylize-k8s", "--type", "kubernetes",
            "--base-job-template", "deploy/kubernetes-gpu-job-template.json")
    prefect("--no-prompt", "deploy", "--all")
    prefect("automation", "create", "--from-file", "prefect.yaml")  # the README's alerts, verbatim

    with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("stylize-catalog/nightly")
        parent = client.read_deployment_by_name("stylize-sharded/nightly-k8s")
        shard = client.read_deployment_by_name("stylize-catalog/k8s-shard")
        template = client.read_work_pool("stylize-k8s").base_job_template
        alerts = {name: client.read_automations_by_name(name) for name in ("stylize nightly failed",
                                                                          "stylize nightly missing")}
    assert {name: [a.trigger.posture for a in found] for name, found in alerts.items()} == \
        {"stylize nightly failed": ["Reactive"], "stylize nightly missing": ["Proactive"]}

    for deployment in (nightly, parent):
        [schedule] = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")
        assert deployment.global_concurrency_limit.limit == 1
    assert shard.schedules == [] and shard.global_concurrency_limit is None
    assert (nightly.work_pool_name, parent.work_pool_name, shard.work_pool_name) == \
        ("stylize-gpu", "stylize-k8s", "stylize-k8s")
    assert parent.parameters["deployment"] == "stylize-catalog/k8s-shard"

    # What the Kubernetes worker would render for each: the pool's template with the job variables.
    def gpu_limit(deployment) -> int:
        defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
        job = apply_values(template["job_configuration"], {**defaults, **deployment.job_variables})
        [container] = job["job_manifest"]["spec"]["template"]["spec"]["containers"]
        return container["resources"]["limits"]["nvidia.com/gpu"]

    assert (gpu_limit(shard), gpu_limit(parent)) == (1, 0)


def test_serve_needs_a_prefect_server(catalog, capsys):
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", str(catalog)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PREFECT_API_URL is not set" in err and "prefect server start" in err

    closed = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings({PREFECT_API_URL: closed}):
        assert main(["serve", str(catalog)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the Prefect server at PREFECT_API_URL={closed} does not answer" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cron", "0 25 * * *"], "schedule cron '0 25 * * *' is invalid: expected five cron fields"),
        (["--timezone", "Mars/Olympus"], "schedule timezone 'Mars/Olympus' is invalid: expected an IANA"),
        (["--shard", "2/2"], "shard '2/2'"),
    ],
    ids=["cron", "timezone", "shard"],
)
def test_serve_refuses_bad_options_before_registering(catalog, capsys, args, message):
    assert main(["serve", str(catalog), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
