"""Credentials never leave the environment: not in output, logs (even with -v), metadata,
run summaries, Prefect artifacts or error messages, on a run whose storage fails."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
from faults import FaultProxy, cli_env

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent.parent / "data"
KEY_ID = "AKIAFAKEKEYID7Q2Z9X4"
SECRET = "FAKESECRETKEY/s3cr3t+W0rth+Gu4rd1ng/0123456789"
TOKEN = "FAKESESSIONTOKEN-IQoJb3JpZ2luX2VjEJr-0123456789"


def prefect_records(flow_run_id: str) -> list[str]:
    """Everything the Prefect API holds about the run: its parameters, logs and artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    run_id = UUID(flow_run_id)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert logs and artifacts  # there is something to search
    return [run.model_dump_json(), *(log.message for log in logs), *(a.model_dump_json() for a in artifacts)]


def test_credentials_appear_nowhere_on_a_run_that_fails_on_storage(s3_server, s3, bucket, tmp_path):
    shutil.copy(DATA / "chelsea.png", tmp_path / "cat.png")
    shutil.copy(DATA / "astronaut.png", tmp_path / "astronaut.png")
    shutil.copy(DATA / "starry_night.jpg", tmp_path / "starry.jpg")
    env = cli_env(tmp_path / "prefect", AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=TOKEN)
    # S3 refuses the cat's image (403); the astronaut's job succeeds, so metadata exists to search too.
    with FaultProxy(s3_server, kinds=("403",), methods=("PUT",), path=r"/out/cat__starry\.png$") as proxy:
        manifest = tmp_path / "manifest.yaml"
        manifest.write_text(f"""
version: 1
output: s3://{bucket}/out
storage: {{endpoint_url: "{proxy.url}", region: us-east-1}}
defaults: {{size: 32, iterations: 2, scales: 1, precision: float32}}
pairs:
  - {{content: cat.png, style: starry.jpg}}
  - {{content: astronaut.png, style: starry.jpg}}
""")
        # -v: DEBUG logging, where botocore would print request headers (the session token).
        run = subprocess.run([sys.executable, "-m", "stylize.app.cli", "-v", "run", str(manifest), "--quiet"],
                             env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "cat__starry" in run.stdout and "access denied (AccessDenied)" in run.stdout
    assert proxy.faults

    texts = {"stdout": run.stdout, "stderr": run.stderr}
    for obj in s3.list_objects_v2(Bucket=bucket)["Contents"]:
        texts[f"s3://{bucket}/{obj['Key']}"] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode("latin-1")
    for path in tmp_path.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("latin-1")
    [summary_key] = [k for k in texts if re.search(r"/out/_runs/[^/]+\.json$", k)]
    summary = json.loads(texts[summary_key])
    assert summary["failures"][0]["job"] == "cat__starry"
    assert any(k.endswith("out/astronaut__starry.json") for k in texts)
    for i, record in enumerate(prefect_records(summary["flow_run_id"])):
        texts[f"prefect API record {i}"] = record

    for where, text in texts.items():
        for secret in (SECRET, TOKEN, KEY_ID):
            assert secret not in text, f"{secret[:12]}... found in {where}"
