"""Careless and hostile manifests through a run (issue 17, the manifest side): a name clash fails only
its jobs (local and S3), an S3 manifest cannot reach the worker's disk, and a standing manifest edited
to write where its grid lists photos is refused on the next run the watcher starts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from test_watch import (  # noqa: F401 - fixtures
    env, in_queue, notify, poll_until, put, put_inputs, put_manifest, sqs, summaries, watcher,
)

from flows.catalog import CatalogFailed, stylize_catalog
from flows.watch import InProcessRuns
from stylize.app.cli import main
from stylize.catalog.events import Routes, RunLedger

DATA = Path(__file__).parent.parent / "data"
FAST = {"size": 32, "iterations": 2, "scales": 1, "precision": "float32"}

pytestmark = pytest.mark.slow


def failed_run(**parameters) -> dict:
    state = stylize_catalog(**parameters, return_state=True)
    assert state.is_failed()
    result = state.result(raise_on_failure=False)
    assert isinstance(result, CatalogFailed), result
    return result.summary


def test_a_name_clash_fails_only_its_jobs_and_the_rest_runs(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "a.png", "b.png"):
        shutil.copy(DATA / "chelsea.png", photos / name)
    shutil.copy(DATA / "starry_night.jpg", tmp_path / "s.jpg")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"version: 1\noutput: out\ndefaults: {json.dumps(FAST)}\n"
                        "grid: {contents: [photos/], styles: [s.jpg]}\n")
    summary = failed_run(manifest=str(manifest))
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 2, "total": 3}
    assert [f["job"] for f in summary["failures"]] == ["a__s", "a__s"]
    for failure in summary["failures"]:
        assert failure["kind"] == "ConfigError"
        assert f"{photos}/a.jpg" in failure["error"] and f"{photos}/a.png" in failure["error"]
    assert (tmp_path / "out" / "b__s.png").exists() and not (tmp_path / "out" / "a__s.png").exists()


def test_s3_keys_that_clash_fail_alone_and_an_s3_manifest_cannot_read_local_files(
        s3, bucket, s3_server, env, image_bytes, tmp_path, capsys):
    put_inputs(s3, bucket, image_bytes, photos=("z",))
    for key in ("photos/x//y.png", "photos/x/y.png"):
        put(s3, bucket, key, image_bytes("png", size=(32, 24)))
    grid = {"contents": [f"s3://{bucket}/photos/"], "styles": [f"s3://{bucket}/styles/starry.jpg"]}
    manifest = put_manifest(s3, bucket, s3_server, "m.yaml", "out", grid=grid).uri
    summary = failed_run(manifest=manifest)
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 2, "total": 3}
    for failure in summary["failures"]:
        assert f"s3://{bucket}/photos/x//y.png" in failure["error"]
        assert f"s3://{bucket}/photos/x/y.png" in failure["error"]

    # A private local photo, named by a manifest in the bucket: refused before Prefect starts...
    private = tmp_path / "private"
    private.mkdir()
    shutil.copy(DATA / "chelsea.png", private / "photo.png")
    pairs = [{"content": str(private / "photo.png"), "style": f"s3://{bucket}/styles/starry.jpg"}]
    manifest = put_manifest(s3, bucket, s3_server, "leak.yaml", "leak", pairs=pairs).uri
    assert main(["run", manifest, "--quiet"]) == 2
    assert "pairs[0].content:" in capsys.readouterr().err
    # ... and by the flow itself (a run started by `watch` or a deployment), which allows nothing.
    state = stylize_catalog(manifest=manifest, return_state=True)
    assert state.is_failed() and "may name only s3:// URIs" in str(state.result(raise_on_failure=False))
    assert summaries(s3, bucket, "leak") == []
    # The operator may allow the folder.
    assert main(["run", manifest, "--quiet", "--allow-local", str(private)]) == 0
    assert len(summaries(s3, bucket, "leak")) == 1


def test_a_standing_manifest_edited_to_feed_its_own_grid_is_refused_on_the_next_run(
        s3, sqs, bucket, s3_server, env, image_bytes, tmp_path, caplog):
    # The grid lists all of photos/; new photos land in photos/incoming/. An output under photos/
    # but beside incoming/ escapes the watcher's images-prefix check, yet the next run lists it.
    put_inputs(s3, bucket, image_bytes, photos=())
    grid = {"contents": [f"s3://{bucket}/photos/"], "styles": [f"s3://{bucket}/styles/starry.jpg"]}
    standing = put_manifest(s3, bucket, s3_server, "manifests/catalog.yaml", "out/catalog", grid=grid).uri
    routes = Routes(images_prefix=f"s3://{bucket}/photos/incoming/", standing_manifest=standing,
                    manifest_prefix=f"s3://{bucket}/manifests/new/")
    queue = notify(s3, sqs, bucket)
    w = watcher(queue, sqs, routes, InProcessRuns(RunLedger(str(tmp_path / "started.sqlite3"))),
                debounce=0, retry_after=1)

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("not starting the run")]

    with caplog.at_level(logging.DEBUG, logger="stylize.watch"):
        put(s3, bucket, "photos/incoming/one.png", image_bytes("png", size=(32, 24), color=(10, 200, 30)))
        poll_until(w, lambda: len(summaries(s3, bucket, "out/catalog")) == 1, 60, "the first photo's run")
        # Edited while the watcher runs: the next run would stylize photos/styled/... too.
        put_manifest(s3, bucket, s3_server, "manifests/catalog.yaml", "photos/styled", grid=grid)
        put(s3, bucket, "photos/incoming/two.png", image_bytes("png", size=(32, 24), color=(200, 10, 30)))
        poll_until(w, lambda: len(refusals()) == 1, 20, "a refusal")
        assert in_queue(sqs, queue) == 1 and summaries(s3, bucket, "photos/styled") == []
        message = refusals()[0].getMessage()
        assert "photos/styled (output)" in message and "grid.contents[0]" in message

        # A new manifest that feeds its own grid is a verdict on that upload: deleted, nothing runs.
        put_manifest(s3, bucket, s3_server, "manifests/new/loop.yaml", "photos/loop", grid=grid)
        poll_until(w, lambda: any("manifests/new/loop.yaml" in r.getMessage() and "not retried" in r.getMessage()
                                  for r in caplog.records), 60, "the new manifest's verdict")
    assert summaries(s3, bucket, "photos/loop") == []
