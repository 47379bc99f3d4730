"""Out of device memory: a job is retried once smaller, or fails saying what would fit, and
the run goes on. CUDA's OutOfMemoryError cannot happen on a CPU, so an Engine that
raises it above a size stands in for a small GPU (the only stand-in in these tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flows.catalog import CatalogFailed, stylize_catalog
from flows.devices import runner_for
from stylize.catalog.jobs import JobRunner
from stylize.catalog.manifest import load_manifest
from stylize.engine.optimize import Engine
from stylize.catalog.storage import Storage

DATA = Path(__file__).parent.parent / "data"


class SmallDevice(Engine):
    """A CPU engine that runs out of "device memory" for outputs longer than ``fits`` px."""

    def __init__(self, fits: int):
        super().__init__("cpu")
        self.fits = fits
        self.sizes: list[int] = []

    def run_batch(self, contents, styles, settings=None, **options):
        self.sizes.append(settings.size)
        if settings.size > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {settings.size ** 2} MiB")
        return super().run_batch(contents, styles, settings, **options)


@pytest.fixture
def catalog(tmp_path):
    """Two pairs: the cat at size 40 (its smaller side and the style's stay >= 16 px at 0.7 x 40), the
    astronaut at 64."""
    shutil.copy(DATA / "chelsea.png", tmp_path / "cat.png")
    shutil.copy(DATA / "astronaut.png", tmp_path / "astronaut.png")
    shutil.copy(DATA / "starry_night.jpg", tmp_path / "starry.jpg")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("""
version: 1
output: out
defaults: {size: 32, iterations: 2, scales: 1, precision: float32, shrink_on_oom: true}
pairs:
  - {content: cat.png, style: starry.jpg, settings: {size: 40}}
  - {content: astronaut.png, style: starry.jpg, settings: {size: 64}}
""")
    return manifest


def test_out_of_memory_retries_once_at_a_smaller_size(catalog):
    runner = JobRunner("cpu")
    runner.engine = SmallDevice(fits=30)
    cat = next(load_manifest(str(catalog)).jobs(Storage()))
    outcome = runner.run(cat, Storage())
    assert outcome.status == "done", outcome.error
    assert runner.engine.sizes == [40, 28]  # 40 x 0.7
    meta = json.loads(Path(cat.metadata_uri).read_text())
    assert meta["retried_at_size"] == 28 and meta["settings"]["size"] == 40
    assert meta["engine"]["sizes"] == [[28, 19]]


def test_out_of_memory_without_the_opt_in_fails_and_never_shrinks(catalog):
    catalog.write_text(catalog.read_text().replace(", shrink_on_oom: true", ""))
    runner = JobRunner("cpu")
    runner.engine = SmallDevice(fits=30)
    cat = next(load_manifest(str(catalog)).jobs(Storage()))
    outcome = runner.run(cat, Storage())
    assert outcome.status == "failed" and runner.engine.sizes == [40]
    assert "out of cpu memory at size 40" in outcome.error and "shrink_on_oom: true" in outcome.error
    assert not Path(cat.image_uri).exists() and not Path(cat.metadata_uri).exists()


def test_out_of_memory_twice_fails_the_job_saying_what_would_fit(catalog):
    runner = JobRunner("cpu")
    runner.engine = SmallDevice(fits=20)
    cat = next(load_manifest(str(catalog)).jobs(Storage()))
    outcome = runner.run(cat, Storage())
    assert outcome.status == "failed"
    assert outcome.error == ("out of cpu memory at size 40 and again at 28; try size 20 or less, "
                             "or a device with more memory")
    assert not Path(cat.image_uri).exists() and not Path(cat.metadata_uri).exists()


def test_a_job_that_never_fits_does_not_stop_the_run(catalog):
    runner_for.cache_clear()
    runner_for("cpu").engine = SmallDevice(fits=32)  # the flow's runner for the CPU slot
    try:
        with pytest.raises(CatalogFailed) as failed:
            stylize_catalog(manifest=str(catalog))
    finally:
        runner_for.cache_clear()
    summary = failed.value.summary
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 1, "total": 2}
    assert summary["failures"] == [{"job": "astronaut__starry", "error": "out of cpu memory at size 64 and again "
                                    "at 45; try size 31 or less, or a device with more memory",
                                    "kind": "ResourceError"}]
    meta = json.loads((catalog.parent / "out" / "cat__starry.json").read_text())
    assert meta["retried_at_size"] == 28
