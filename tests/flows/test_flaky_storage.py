"""The catalog flow over a flaky S3: faults are retried and outputs are right, and a key that
always fails is reported as that job's failure while the others finish."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from faults import FaultProxy

import flows.catalog as catalog
from flows.catalog import WRITE_RETRIES, CatalogFailed, stylize_catalog
from stylize.engine import images
from stylize.catalog import metadata
from stylize.errors import TransientStorageError
from stylize.catalog.jobs import JobRunner, key_for, read_inputs
from stylize.catalog.manifest import load_manifest
from stylize.catalog.storage import Storage

DATA = Path(__file__).parent.parent / "data"
FAST = {"size": 32, "iterations": 2, "scales": 1, "precision": "float32"}
INPUTS = {"in/photos/cat.png": "chelsea.png", "in/photos/astronaut.png": "astronaut.png",
          "in/styles/starry.jpg": "starry_night.jpg", "in/styles/wreck.jpg": "shipwreck.jpg"}


def s3_catalog(s3, bucket: str, folder: Path, endpoint: str, **storage) -> Path:
    """A local manifest over S3 inputs and outputs: 2 photos x 2 styles, storage tuned by ``storage``."""
    for key, local in INPUTS.items():
        s3.put_object(Bucket=bucket, Key=key, Body=(DATA / local).read_bytes())
    block = {"endpoint_url": endpoint, "region": "us-east-1", **storage}
    manifest = folder / "manifest.yaml"
    manifest.write_text(f"""
version: 1
output: s3://{bucket}/out
storage: {json.dumps(block)}
defaults: {json.dumps(FAST)}
grid:
  contents: [s3://{bucket}/in/photos/]
  styles: [s3://{bucket}/in/styles/starry.jpg, s3://{bucket}/in/styles/wreck.jpg]
""")
    return manifest


def assert_complete(manifest: Path, direct: Storage, s3, bucket: str) -> None:
    """Every job's image decodes, its metadata is complete and records the true input checksums."""
    truth = {f"s3://{bucket}/{key}": hashlib.sha256((DATA / local).read_bytes()).hexdigest()
             for key, local in INPUTS.items()}
    jobs = list(load_manifest(str(manifest)).jobs(direct))
    assert len(jobs) == 4
    for job in jobs:
        images.decode(direct.read(job.image_uri), name=job.image_uri)
        assert metadata.is_complete(direct, job, key_for(job, read_inputs(job, direct))), job.name
        meta = json.loads(direct.read(job.metadata_uri))
        assert meta["inputs"]["content"]["sha256"] == truth[job.content]
        assert meta["inputs"]["styles"][0]["sha256"] == truth[job.styles[0]]


def test_a_catalog_completes_through_20_percent_faults(s3, bucket, s3_server, tmp_path):
    # Resets, stalls, 500s, 503s and truncated answers on one request in five, every method.
    with FaultProxy(s3_server, rate=0.2, seed=7, stall_seconds=5) as proxy:
        manifest = s3_catalog(s3, bucket, tmp_path, proxy.url, read_timeout=1, connect_timeout=1)
        summary = stylize_catalog(manifest=str(manifest), retry_delay=0)
    assert summary["counts"] == {"done": 4, "skipped": 0, "failed": 0, "total": 4}, summary["failures"]
    kinds = {kind for kind, _, _ in proxy.faults}
    assert len(proxy.faults) >= 5 and len(kinds) >= 3, proxy.faults
    assert_complete(manifest, Storage(endpoint_url=s3_server), s3, bucket)


def test_a_key_that_always_fails_fails_its_job_only(s3, bucket, s3_server, tmp_path):
    direct = Storage(endpoint_url=s3_server)
    manifest = s3_catalog(s3, bucket, tmp_path, s3_server)
    assert stylize_catalog(manifest=str(manifest))["counts"]["done"] == 4
    old_image = direct.read(f"s3://{bucket}/out/cat__starry.png")

    # Changed settings rerun every job; every write of one image is refused with a 500.
    with FaultProxy(s3_server, kinds=("500",), methods=("PUT",), path=r"/out/cat__starry\.png$") as proxy:
        manifest = s3_catalog(s3, bucket, tmp_path, proxy.url, max_attempts=1)
        with pytest.raises(CatalogFailed) as failed:
            stylize_catalog(manifest=str(manifest), settings={"iterations": 3}, retry_delay=0)
    summary = failed.value.summary
    assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 1, "total": 4}
    [failure] = summary["failures"]
    assert failure["job"] == "cat__starry"
    assert failure["error"] == f"s3://{bucket}/out/cat__starry.png: S3 error InternalError (transient, retry later)"
    assert len(proxy.faults) == 4 * 2  # (1 try + 3 task retries) x (1 + max_attempts=1 botocore retry)

    # A pending document replaced the old metadata before the failed write, so nothing claims the old
    # image is this run's (the job is incomplete), and it is still stylize's to replace.
    assert json.loads(direct.read(f"s3://{bucket}/out/cat__starry.json"))["pending"] is True
    assert direct.read(f"s3://{bucket}/out/cat__starry.png") == old_image
    for name in ("cat__wreck", "astronaut__starry", "astronaut__wreck"):
        assert json.loads(direct.read(f"s3://{bucket}/out/{name}.json"))["settings"]["iterations"] == 3


def local_catalog(folder: Path) -> Path:
    """2 same-size photos x 1 style on local disk: one batch of two jobs with images_per_batch=2."""
    (folder / "photos").mkdir(parents=True)
    (folder / "photos" / "cat.png").write_bytes((DATA / "chelsea.png").read_bytes())
    (folder / "photos" / "kitten.png").write_bytes((DATA / "chelsea.png").read_bytes())
    (folder / "starry.jpg").write_bytes((DATA / "starry_night.jpg").read_bytes())
    manifest = folder / "manifest.yaml"
    manifest.write_text(f"version: 1\noutput: out\ndefaults: {json.dumps(FAST)}\n"
                        "grid: {contents: [photos/], styles: [starry.jpg]}\n")
    return manifest


def flaky_writes(monkeypatch, job: str, fail_times: int) -> dict[str, list]:
    """``job``'s writes fail transiently ``fail_times`` times, then go through; counts every
    write and every optimization."""
    calls: dict[str, list] = {"writes": [], "computes": []}
    real_finish, real_compute = catalog.finish, JobRunner.compute_batch

    def finish(prepared, result, storage):
        calls["writes"].append(prepared.job.name)
        if prepared.job.name == job and calls["writes"].count(job) <= fail_times:
            raise TransientStorageError(f"{prepared.image_uri}: S3 error SlowDown (transient, retry later)")
        return real_finish(prepared, result, storage)

    def compute_batch(self, batch, *args, **kwargs):
        calls["computes"].append(sorted(p.job.name for p in batch))
        return real_compute(self, batch, *args, **kwargs)

    monkeypatch.setattr(catalog, "finish", finish)
    monkeypatch.setattr(JobRunner, "compute_batch", compute_batch)
    return calls


@pytest.mark.parametrize("per_batch, computes", [
    (1, [["cat__starry"], ["kitten__starry"]]),  # groups of one take the same path
    (2, [["cat__starry", "kitten__starry"]]),
])
def test_a_failed_write_is_retried_without_computing_again(monkeypatch, tmp_path, per_batch, computes):
    calls = flaky_writes(monkeypatch, "cat__starry", fail_times=2)
    summary = stylize_catalog(manifest=str(local_catalog(tmp_path)), images_per_batch=per_batch, retry_delay=0)
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 0, "total": 2}
    assert sorted(calls["computes"]) == computes  # each image computed once
    assert calls["writes"].count("cat__starry") == 3 and calls["writes"].count("kitten__starry") == 1


def test_a_write_that_keeps_failing_fails_its_job_not_its_batch_mates(monkeypatch, tmp_path):
    calls = flaky_writes(monkeypatch, "cat__starry", fail_times=100)
    with pytest.raises(CatalogFailed) as failed:
        stylize_catalog(manifest=str(local_catalog(tmp_path)), images_per_batch=2, retry_delay=0)
    summary = failed.value.summary
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 1, "total": 2}
    [failure] = summary["failures"]
    assert failure["job"] == "cat__starry" and "S3 error SlowDown" in failure["error"]
    assert calls["computes"] == [["cat__starry", "kitten__starry"]]
    assert calls["writes"].count("cat__starry") == 1 + WRITE_RETRIES
    assert (tmp_path / "out" / "kitten__starry.json").exists()
