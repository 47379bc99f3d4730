"""Crash safety of `stylize run`: killed at any point (SIGKILL), nothing is half-written and a
re-run redoes exactly the unfinished jobs; SIGTERM stops it promptly; two runs at once
corrupt nothing. Each test runs `stylize run` as a child process against the session's
Prefect API, on local folders and on S3 behind a proxy that stalls chosen uploads."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import time
from pathlib import Path

import boto3
import pytest
from faults import FaultProxy, cli_env, kill, start_run, wait_until

from stylize.catalog import metadata
from stylize.engine import images
from stylize.catalog.storage import is_listed_image

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent.parent / "data"
# Kill points come from this seed: a failure can be replayed exactly.
SEED = 20261126
SETTINGS = {"size": 32, "iterations": 3, "scales": 1, "precision": "float32", "tolerance": 0}
JOBS = 9  # 3 photos x 3 styles
TEMP = re.compile(r"\.stylize\.[0-9a-f]{12}\.tmp")  # storage._write_local's temporary names


def catalog(root: Path, output: str, storage: str = "", settings: dict | None = None,
            grid: str = "contents: [photos/]\n  styles: [starry.jpg, wreck.jpg, suit.png]") -> Path:
    """A grid manifest over local photos; ``output`` local or s3://, ``storage`` a YAML block."""
    photos = root / "photos"
    if not photos.exists():
        photos.mkdir(parents=True)
        shutil.copy(DATA / "chelsea.png", photos / "cat.png")
        shutil.copy(DATA / "astronaut.png", photos / "astronaut.png")
        shutil.copy(DATA / "shipwreck.jpg", photos / "ship.jpg")
        shutil.copy(DATA / "starry_night.jpg", root / "starry.jpg")
        shutil.copy(DATA / "shipwreck.jpg", root / "wreck.jpg")
        shutil.copy(DATA / "astronaut.png", root / "suit.png")
    manifest = root / "manifest.yaml"
    manifest.write_text(f"""
version: 1
output: {output}
{storage}
defaults: {json.dumps(settings or SETTINGS)}
grid:
  {grid}
""")
    return manifest


def check_local(out: Path) -> int:
    """Assert the crash-safety invariants over a local output folder; returns the complete jobs.

    Every NAME.png decodes fully; every NAME.json is pending (its job stopped while writing,
    so it is not complete) or describes NAME.png, size and checksum; anything else is a
    temporary file that no listing would take for an image.
    """
    complete = 0
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = path.relative_to(out).as_posix()
        if TEMP.fullmatch(path.name):
            assert not is_listed_image(relative), relative
        elif "_runs" in path.relative_to(out).parts:
            check_run_file(relative, path.read_bytes())  # a run summary, job log or report, whole
        elif relative.startswith("_thumbs/"):
            images.decode(path.read_bytes(), name=relative)  # a thumbnail, whole
        elif path.suffix == ".png":
            images.decode(path.read_bytes(), name=relative)
        elif path.suffix == ".json":
            meta = json.loads(path.read_text())
            image = path.with_suffix(".png")
            assert meta["output"]["uri"] == str(image), relative
            if meta.get("pending"):
                continue
            assert image.is_file(), f"{relative} without its image"
            assert metadata.output_record(str(image), image.read_bytes()) == meta["output"], relative
            assert (out / meta["thumbnails"]["output"]).is_file(), f"{relative} without its thumbnail"
            complete += 1
        else:
            raise AssertionError(f"unexpected file {relative}")
    return complete


def check_run_file(name: str, data: bytes) -> None:
    """A file under _runs/ is whole: JSON that parses, or a report page that ends its document."""
    if name.endswith(".html"):
        assert data.rstrip().endswith(b"</html>"), name
    else:
        json.loads(data)


def check_s3(client, bucket: str) -> int:
    """The same invariants over ``s3://bucket/out/`` (S3 has no temporary objects)."""
    listed = client.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])
    objects = {o["Key"]: o["Size"] for o in listed}
    etags = {o["Key"]: o["ETag"].strip('"') for o in listed}
    complete = 0
    for key, size in objects.items():
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        if key.startswith("out/_runs/"):
            check_run_file(key, body)
        elif key.startswith("out/_thumbs/"):
            images.decode(body, name=key)
        elif key.endswith(".png"):
            images.decode(body, name=key)
        else:
            assert key.endswith(".json"), key
            meta = json.loads(body)
            image = key.removesuffix(".json") + ".png"
            assert meta["output"]["uri"] == f"s3://{bucket}/{image}", key
            if meta.get("pending"):
                continue
            assert image in objects, f"{key} without its image"
            assert (meta["output"]["size"], meta["output"]["etag"]) == (objects[image], etags[image]), key
            complete += 1
    return complete


def kill_during_next_job(process, out: Path, after: int, rng: random.Random) -> None:
    """SIGKILL ``process`` a seeded random fraction of a job's time after the ``after``-th job this
    run completes.

    The job before it is timed (from the previous completed metadata to this one) so the kill lands
    inside the next job on a fast machine and a slow one alike: in its optimization, in a
    write, or between its image and its metadata. Only this run's completed jobs count: the
    files an earlier run left (complete, or pending where it was killed) would otherwise let the
    timed span include this process's start-up, and the kill come after the catalog's end.
    """
    began = time.time()

    def finished() -> int:
        count = 0
        for path in out.glob("*.json"):
            try:
                if path.stat().st_mtime >= began and not json.loads(path.read_text()).get("pending"):
                    count += 1
            except (OSError, ValueError):  # replaced while read: counted on the next look
                pass
        return count

    wait_until(lambda: finished() >= after - 1, 240, f"{after - 1} finished jobs", process)
    started = time.monotonic()
    wait_until(lambda: finished() >= after, 240, f"{after} finished jobs", process)
    time.sleep(rng.uniform(0.0, 1.0) * (time.monotonic() - started))
    kill(process)


def last_summary(runs: list[dict]) -> dict:
    return max(runs, key=lambda s: s["started"])


def local_summaries(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]


def finish_run(manifest: Path, env: dict, log: Path) -> None:
    process = start_run(manifest, env, log=log)
    assert process.wait(240) == 0, log.read_text()[-3000:]


def test_sigkill_at_random_points_loses_nothing_local(tmp_path):
    rng = random.Random(SEED)
    out = tmp_path / "out"
    # Jobs of a few tenths of a second: at 3 iterations a 32 px job takes tens of milliseconds, and
    # a batch of them could end between two looks at the folder, before the kill.
    manifest = catalog(tmp_path, "out", settings=dict(SETTINGS, iterations=60))
    env = cli_env(tmp_path / "prefect")
    done = 0
    for attempt in range(2):
        # Two or three more jobs (the first of a run includes the process's start-up, so it is not
        # timed), then a kill at a random moment of the next one.
        # One image per VGG pass, so that jobs end one by one and the span timed is one job's.
        process = start_run(manifest, env, "--images-per-batch", "1", log=tmp_path / f"run{attempt}.log")
        # At most JOBS - 3 in all: at least two whole jobs of margin after the targeted one, so a
        # machine whose load drops mid-run still cannot finish the catalog before the kill; and
        # at least 2 in this run, as the first includes the process's start-up.
        after = min(rng.randint(2, 3), JOBS - 3 - done)
        assert after >= 2, f"{done} jobs done after the first kill: no room left for a second"
        kill_during_next_job(process, out, after, rng)
        done = check_local(out)
        assert done < JOBS, "the run finished before it was killed; the kill tested nothing"

    finish_run(manifest, env, tmp_path / "final.log")
    assert check_local(out) == JOBS
    counts = last_summary(local_summaries(out))["counts"]
    assert counts == {"done": JOBS - done, "skipped": done, "failed": 0, "total": JOBS}


def test_sigkill_during_upload_and_between_image_and_metadata_s3(s3_server, s3, bucket, tmp_path):
    env = cli_env(tmp_path / "prefect")
    storage = 'storage: {{endpoint_url: "{}", region: us-east-1}}'
    direct = boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1")

    # 1. Stall the first image upload, kill while it hangs: that image must not exist at all.
    with FaultProxy(s3_server, kinds=("stall",), methods=("PUT",), path=r"/out/[^/_][^/]*\.png$", limit=1) as proxy:
        manifest = catalog(tmp_path, f"s3://{bucket}/out", storage.format(proxy.url))
        process = start_run(manifest, env, log=tmp_path / "upload.log")
        [(_, _, stalled)] = proxy.wait_for_fault(timeout=240)
        kill(process)
    done = check_s3(direct, bucket)
    key = stalled.split("?")[0].removeprefix(f"/{bucket}/")
    assert key.endswith(".png") and key not in {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}

    # 2. Stall the second metadata upload (the first is the pending document written before an
    # image): the job is not complete, and its image, if written, is whole.
    with FaultProxy(s3_server, kinds=("stall",), methods=("PUT",), path=r"/out/[^/_][^/]*\.json$", limit=1,
                    after=1) as proxy:
        manifest = catalog(tmp_path, f"s3://{bucket}/out", storage.format(proxy.url))
        process = start_run(manifest, env, log=tmp_path / "metadata.log")
        [(_, _, stalled)] = proxy.wait_for_fault(timeout=240)
        kill(process)
    done = check_s3(direct, bucket)
    key = stalled.split("?")[0].removeprefix(f"/{bucket}/")
    names = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert key not in names or json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())["pending"]
    assert done < JOBS

    # 3. A clean re-run redoes exactly the unfinished jobs.
    manifest = catalog(tmp_path, f"s3://{bucket}/out", storage.format(s3_server))
    finish_run(manifest, env, tmp_path / "final.log")
    assert check_s3(direct, bucket) == JOBS
    summaries = [json.loads(direct.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
                 for o in direct.list_objects_v2(Bucket=bucket, Prefix="out/_runs/")["Contents"]
                 if re.fullmatch(r"out/_runs/[^/]+\.json", o["Key"])]
    counts = last_summary(summaries)["counts"]
    assert counts == {"done": JOBS - done, "skipped": done, "failed": 0, "total": JOBS}


def test_two_runs_of_one_manifest_at_once_corrupt_nothing(tmp_path):
    out = tmp_path / "out"
    manifest = catalog(tmp_path, "out")
    first = start_run(manifest, cli_env(tmp_path / "prefect1"), log=tmp_path / "first.log")
    second = start_run(manifest, cli_env(tmp_path / "prefect2"), log=tmp_path / "second.log")
    assert first.wait(240) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert second.wait(240) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert check_local(out) == JOBS
    runs = local_summaries(out)
    assert len(runs) == 2
    for run in runs:
        assert run["counts"]["done"] + run["counts"]["skipped"] == JOBS and run["counts"]["failed"] == 0


def test_sigterm_stops_a_run_promptly_and_cleanly(tmp_path):
    # One job of ~5,000 iterations (minutes); snapshots every iteration show it is under way.
    slow = dict(SETTINGS, iterations=5000, save_every=1)
    manifest = catalog(tmp_path, "out", settings=slow, grid="contents: [photos/cat.png]\n  styles: [starry.jpg]")
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    process = start_run(manifest, cli_env(tmp_path / "prefect"), log=log)
    wait_until(lambda: any(out.glob("*.iter*.png")), 240, "the first snapshot", process)
    seconds = kill(process, signal.SIGTERM, timeout=60)
    assert process.returncode == 143, log.read_text()[-3000:]
    assert seconds < 20, f"SIGTERM took {seconds:.1f} s to stop the run"
    text = log.read_text()
    assert "stylize: stopped by SIGTERM" in text and "Cancelled: stopped at iteration" in text
    assert not (out / "cat__starry.png").exists() and not (out / "cat__starry.json").exists()
    for snapshot in out.glob("*.iter*.png"):  # intermediate images are whole too
        images.decode(snapshot.read_bytes(), name=snapshot.name)
