"""The catalog flow reports typed events, from its task threads, to the sink of whoever called it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flows.catalog import stylize_catalog
from stylize.catalog.progress import Iteration, JobFinished, RunStarted, reporting

DATA = Path(__file__).parent.parent / "data"


def test_a_run_reports_start_iterations_and_each_job(tmp_path):
    (tmp_path / "photos").mkdir()
    shutil.copy(DATA / "chelsea.png", tmp_path / "photos" / "cat.png")
    shutil.copy(DATA / "astronaut.png", tmp_path / "photos" / "astronaut.png")
    shutil.copy(DATA / "starry_night.jpg", tmp_path)
    settings = {"size": 32, "iterations": 2, "scales": 1, "precision": "float32"}
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(f"version: 1\noutput: out\ndefaults: {json.dumps(settings)}\n"
                        "grid: {contents: [photos/], styles: [starry_night.jpg]}\n")
    seen: list = []
    with reporting(seen.append):
        stylize_catalog(manifest=str(manifest), workers=2)  # two task threads at once

    assert seen[0] == RunStarted(2)
    jobs = {"cat__starry_night", "astronaut__starry_night"}
    iterations = [e for e in seen if isinstance(e, Iteration)]
    assert {e.job for e in iterations} == jobs and {e.limit for e in iterations} == {2}
    assert sorted(e.record.iteration for e in iterations if e.job == "cat__starry_night") == [0, 1, 2]
    finished = [e for e in seen if isinstance(e, JobFinished)]
    assert [(e.finished, e.total) for e in finished] == [(1, 2), (2, 2)]
    assert {e.outcome.job for e in finished} == jobs and {e.outcome.status for e in finished} == {"done"}
