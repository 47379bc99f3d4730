"""Every catalog run writes its HTML report and links it in Prefect; `stylize report` rebuilds it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from uuid import UUID

from stylize.app.cli import main
from flows.catalog import stylize_catalog

DATA = Path(__file__).parent.parent / "data"
FAST = {"size": 32, "iterations": 3, "scales": 1, "precision": "float32"}


def artifacts(flow_run_id: str) -> dict[str, object]:
    """The run's artifacts by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])))
    return {a.key: a for a in found}


def cards(html: str) -> dict[str, str]:
    """Job name -> status, from the contact sheet."""
    return dict((name, status) for status, name in
                re.findall(r'<article class="job (\w+)" id="j\d+">\s*<h3>([^<]*)</h3>', html))


def test_each_run_writes_a_report_and_stylize_report_covers_both(tmp_path, monkeypatch, capsys):
    root = tmp_path / "catalog"
    (root / "photos").mkdir(parents=True)
    shutil.copy(DATA / "chelsea.png", root / "photos" / "cat.png")
    (root / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    shutil.copy(DATA / "starry_night.jpg", root / "starry.jpg")
    (root / "manifest.yaml").write_text(
        f"version: 1\noutput: out\ndefaults: {json.dumps(FAST)}\n"
        "grid:\n  contents: [photos/]\n  styles: [starry.jpg]\n")
    out = root / "out"
    monkeypatch.setenv("STYLIZE_OUTPUT_URL", "https://photos.example/out/")
    first = stylize_catalog(manifest=str(root / "manifest.yaml"), max_failures=5)
    shutil.copy(DATA / "astronaut.png", root / "photos" / "astronaut.png")
    second = stylize_catalog(manifest=str(root / "manifest.yaml"), max_failures=5)
    assert second["counts"] == {"done": 1, "skipped": 1, "failed": 1, "total": 3}

    html = (out / "_runs" / f"{second['flow_run_id']}.html").read_text()
    assert cards(html) == {"astronaut__starry": "done", "cat__starry": "skipped", "broken__starry": "failed"}
    assert re.search(r"<b>1</b><span>done</span>.*<b>1</b><span>skipped</span>.*<b>1</b><span>failed</span>",
                     html, re.S)
    assert "InputError: 1 job" in html and "grid.contents[0].content" in html
    assert html.count('<svg class="curve"') == 2
    for thumb in re.findall(r'src="\.\./([^"]+)"', html):
        assert (out / thumb).is_file(), thumb
    assert second["report_uri"] == str(out / "_runs" / f"{second['flow_run_id']}.html")

    made = artifacts(second["flow_run_id"])
    # Prefect stores a link artifact as markdown: [text](link).
    assert f"https://photos.example/out/_runs/{second['flow_run_id']}.html" in made["stylize-report"].data
    assert "![astronaut__starry](https://photos.example/out/_thumbs/astronaut__starry.jpg)" in \
        made["stylize-summary"].data

    # The whole output: both runs, every job with an output.
    (out / "_runs" / f"{first['flow_run_id']}.html").unlink()
    assert main(["report", str(out)]) == 0
    catalog = (out / "_runs" / "catalog.html").read_text()
    assert first["flow_run_id"] in catalog and second["flow_run_id"] in catalog
    assert cards(catalog) == {"astronaut__starry": "done", "cat__starry": "done"}
    assert "InputError: 2 jobs" in catalog  # the broken photo failed in both runs
    # One run, rebuilt from its files alone.
    assert main(["report", str(out), "--run", first["flow_run_id"]]) == 0
    rebuilt = (out / "_runs" / f"{first['flow_run_id']}.html").read_text()
    assert cards(rebuilt) == {"cat__starry": "done", "broken__starry": "failed"}
    assert "wrote" in capsys.readouterr().out


def test_s3_run_writes_report_and_thumbnails_to_the_bucket(s3, bucket, s3_server, monkeypatch):
    from test_catalog import s3_manifest

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.delenv("STYLIZE_OUTPUT_URL", raising=False)
    summary = stylize_catalog(manifest=s3_manifest(s3, bucket, s3_server))
    run_id = summary["flow_run_id"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert {f"out/_runs/{run_id}.html", f"out/_runs/{run_id}/jobs-000000.json", "out/_thumbs/cat__starry.jpg",
            "out/_thumbs/astronaut__starry.jpg"} <= keys
    assert sum(k.startswith("out/_thumbs/_inputs/") for k in keys) == 3  # two photos and one style
    page = s3.get_object(Bucket=bucket, Key=f"out/_runs/{run_id}.html")
    assert page["ContentType"].startswith("text/html")
    html = page["Body"].read().decode()
    assert cards(html) == {"cat__starry": "done", "astronaut__starry": "done"}
    for thumb in re.findall(r'src="\.\./([^"]+)"', html):
        assert f"out/{thumb}" in keys, thumb
    made = artifacts(run_id)
    assert f"s3://{bucket}/out/_runs/{run_id}.html" in made["stylize-report"].data
    assert "First outputs" not in made["stylize-summary"].data  # S3 without a served URL: no thumbnails
