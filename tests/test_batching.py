"""Grouping jobs into batches over a bounded look-ahead (stylize.catalog.batching)."""

import io
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from stylize.catalog.batching import group_jobs, image_size, padded_fill
from stylize.catalog.manifest import Job
from stylize.catalog.storage import Storage
from stylize.engine.settings import Settings

SETTINGS = Settings(size=64, iterations=2, scales=1)
# The six crops of benchmarks/catalog.py as (w, h) photos.
SHAPES = [(400, 300), (450, 300), (480, 270), (300, 300), (300, 400), (270, 480)]


def grid(photos: int, styles: int = 3, settings: Settings = SETTINGS):
    """Jobs in manifest grid order (photo by photo, style by style) with photo i of shape SHAPES[i % 6]."""
    for i in range(photos):
        for s in range(styles):
            yield Job(f"p{i}__s{s}", f"/in/p{i}.jpg", (f"/styles/s{s}.jpg",), settings, "/out", "grid", i * styles + s)


def shape_of(job: Job):
    return SHAPES[int(job.content.split("/p")[1].split(".")[0]) % len(SHAPES)]


def test_every_job_once_in_groups_that_share_styles_and_settings():
    jobs = list(grid(60))
    groups = list(group_jobs(jobs, 4, shape_of=shape_of, lookahead=64))
    assert sorted(j.name for g in groups for j in g) == sorted(j.name for j in jobs)
    for g in groups:
        assert 1 <= len(g) <= 4
        assert len({(j.styles, j.settings) for j in g}) == 1


def test_grid_of_mixed_shapes_fills_batches():
    """The issue's case: 60 photos in 6 shapes times 3 styles, batches of 4, were 1.2 images per pass."""
    groups = list(group_jobs(grid(60), 4, shape_of=shape_of, lookahead=256))
    occupancy = 180 / len(groups) / 4
    assert occupancy >= 0.9, [len(g) for g in groups]


def test_padding_only_between_shapes_that_fill_the_batch():
    """Leftovers of different shapes pad together only when their pixels fill ``min_fill`` of the box."""
    jobs = list(grid(6, styles=1))  # one photo of each shape
    groups = list(group_jobs(jobs, 4, shape_of=shape_of, lookahead=1000, min_fill=0.8))
    for g in groups:
        shapes = [(64 * w // max(w, h), 64 * h // max(w, h)) for w, h in map(shape_of, g)]
        assert padded_fill(shapes) >= 0.8
    landscape = {"p0__s0", "p1__s0", "p2__s0"}
    assert any(landscape <= {j.name for j in g} for g in groups)  # 4:3, 3:2, 16:9 in one 64x48 box
    for g in groups:  # a portrait never pads with a landscape: at most 0.75 of a square
        names = {j.name for j in g}
        assert not (names & landscape and names & {"p4__s0", "p5__s0"})


def test_unknown_shapes_and_refused_jobs():
    jobs = list(grid(8, styles=1))
    refused = Job("bad", "/in/bad.jpg", ("/styles/s0.jpg",), None, "/out", "pairs[0]", 99, problem="size: too big")
    groups = list(group_jobs([refused] + jobs, 4, shape_of=lambda job: None, lookahead=100))
    assert groups[0] == [refused]
    assert sorted(len(g) for g in groups[1:]) == [4, 4]  # unknown shapes group among themselves


def test_no_job_waits_past_the_lookahead():
    """A shape that never fills its batch is handed on within ``lookahead`` jobs of its arrival."""
    lone = Job("lone", "/in/p4.jpg", ("/styles/other.jpg",), SETTINGS, "/out", "grid", 0)
    arrived = []

    def arrivals():
        for job in itertools.chain([lone], grid(600)):
            arrived.append(job)
            yield job

    for group in group_jobs(arrivals(), 4, shape_of=shape_of, lookahead=50):
        if lone in group:
            break
    assert len(arrived) == 51  # the lone job, then 50 others


_PEAK = """
import sys, tracemalloc
from test_batching import grid, shape_of
from stylize.catalog.batching import group_jobs
tracemalloc.start()
count = sum(len(g) for g in group_jobs(grid(int(sys.argv[1]), styles=1), 4, shape_of=shape_of, lookahead=256))
assert count == int(sys.argv[1])
print(tracemalloc.get_traced_memory()[1])
"""


def _peak_bytes(photos: int) -> int:
    """Peak traced memory while grouping ``photos`` jobs, in a fresh interpreter: tracemalloc counts
    every thread of its process, and in a full test session the Prefect harness's threads (started by
    tests/flows) allocate a few hundred KB in the background, more the longer the measurement runs."""
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]))
    run = subprocess.run([sys.executable, "-c", _PEAK, str(photos)], env=env, capture_output=True, text=True,
                         check=True)
    return int(run.stdout.split()[-1])


def test_memory_flat_over_100000_jobs():
    small, large = _peak_bytes(10_000), _peak_bytes(100_000)
    assert large <= 1.2 * small, (small, large)


def test_image_size_from_the_header(tmp_path):
    storage = Storage()
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    assert image_size(storage, str(tmp_path / "a.png")) == (40, 30)
    # A JPEG whose EXIF says "rotate 90": decoding turns it upright, so its shape is portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30)).save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert image_size(storage, str(tmp_path / "r.jpg")) == (30, 40)
    (tmp_path / "not.png").write_bytes(b"plain text")
    assert image_size(storage, str(tmp_path / "not.png")) is None
    assert image_size(storage, str(tmp_path / "missing.png")) is None


def test_image_size_on_s3(s3_server, s3, bucket):
    data = io.BytesIO()
    Image.new("RGB", (50, 20)).save(data, format="JPEG")
    s3.put_object(Bucket=bucket, Key="photos/a.jpg", Body=data.getvalue())
    assert image_size(Storage(endpoint_url=s3_server), f"s3://{bucket}/photos/a.jpg") == (50, 20)


@pytest.mark.parametrize("shapes, fill", [([(64, 48)] * 4, 1.0), ([(64, 48), (48, 64)], 0.75),
                                          ([(64, 48), (64, 36)], (64 * 48 + 64 * 36) / (2 * 64 * 48))])
def test_padded_fill(shapes, fill):
    assert padded_fill(shapes) == pytest.approx(fill)
