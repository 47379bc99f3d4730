"""Keeping a bounded number of jobs in flight (stylize.catalog.scheduling), on a real thread pool."""

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import pytest

from stylize.catalog.manifest import Job
from stylize.catalog.scheduling import sliding_window


def jobs(n: int):
    return [Job(f"j{i}", f"/in/{i}.png", ("/s.png",), None, "/out", "grid", i) for i in range(n)]


def first_done(futures):
    return next(iter(wait(list(futures), return_when=FIRST_COMPLETED).done))


class Running:
    """Counts the jobs whose group is running, and the most at once."""

    def __init__(self):
        self.now = self.most = 0
        self.lock = threading.Lock()

    def run(self, group, seconds):
        with self.lock:
            self.now += len(group)
            self.most = max(self.most, self.now)
        time.sleep(seconds(group))
        with self.lock:
            self.now -= len(group)
        return [job.name for job in group]


@pytest.mark.parametrize("bound, sizes", [(4, [1] * 20), (6, [2, 1, 3, 2, 2, 1, 3, 3, 1, 2]), (3, [3] * 5)])
def test_at_most_the_bound_in_flight_and_every_group_once(bound, sizes):
    all_jobs, groups, at = jobs(sum(sizes)), [], 0
    for n in sizes:
        groups.append(all_jobs[at:at + n])
        at += n
    running = Running()
    with ThreadPoolExecutor(max_workers=16) as pool:  # more threads than the bound: only the window limits
        finished = [g for _, g in sliding_window(
            iter(groups), bound, lambda g: pool.submit(running.run, g, lambda g: 0.01 * (1 + int(g[0].name[1:]) % 3)),
            first_done)]
    assert running.most <= bound
    assert running.most >= bound - max(sizes) + 1  # the window does fill
    assert sorted(j.name for g in finished for j in g) == sorted(j.name for j in all_jobs)


def test_no_barrier_the_next_group_goes_as_soon_as_one_finishes():
    """One slow job does not hold back the others: with 4 in flight, the 3 other places keep
    turning over while it runs, so many later jobs finish before it."""
    running = Running()
    slow = lambda g: 0.5 if g[0].name == "j0" else 0.01  # noqa: E731
    with ThreadPoolExecutor(max_workers=8) as pool:
        order = [g[0].name for _, g in sliding_window(
            ([j] for j in jobs(40)), 4, lambda g: pool.submit(running.run, g, slow), first_done)]
    assert order.index("j0") >= 20, order  # a window barrier of 4 would let at most 3 finish first
    assert running.most <= 4


def test_groups_are_pulled_only_when_they_can_go():
    pulled = []

    def groups():
        for job in jobs(10):
            pulled.append(job)
            yield [job]

    finished = 0
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in sliding_window(groups(), 3, lambda g: pool.submit(time.sleep, 0.01), first_done):
            assert len(pulled) - finished <= 4  # the bound, plus the one waiting for a place
            finished += 1
    assert finished == 10


def test_a_group_larger_than_the_bound_goes_alone_and_a_bound_below_one_is_refused():
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = list(sliding_window([jobs(5)], 2, lambda g: pool.submit(len, g), first_done))
    assert [f.result() for f, _ in done] == [5]
    with pytest.raises(ValueError, match="bound"):
        list(sliding_window([], 0, None, None))


_PEAK = """
import sys, tracemalloc
from concurrent.futures import Future
from stylize.catalog.batching import group_jobs, header_shapes
from stylize.catalog.manifest import Job
from stylize.catalog.scheduling import sliding_window
from stylize.catalog.storage import Storage
from stylize.engine.settings import Settings

def submit(group):
    future = Future()
    future.set_result(len(group))
    return future

def grid(folder, jobs, settings=Settings(size=32, iterations=2, scales=1)):
    for n in range(jobs):  # photo by photo, 10 styles each, over the 1,000 photos again and again
        photo, style = n // 10 % 1000, n % 10
        yield Job(f"{n}__s{style}", f"{folder}/p{photo:04d}.png", (f"{folder}/s{style}.png",), settings, "/out",
                  "grid.contents[0]", n)

tracemalloc.start()
groups = group_jobs(grid(sys.argv[1], int(sys.argv[2])), 4, shape_of=header_shapes(Storage()))
count = sum(f.result() for f, _ in sliding_window(groups, 16, submit, lambda fs: next(iter(fs))))
print(count, tracemalloc.get_traced_memory()[1])
"""


def test_grouping_and_window_flat_over_100000_jobs(tmp_path):
    """10,000 then 100,000 jobs of 10 styles over 1,000 photos (two shapes, sizes read from their
    headers), grouped and run through the window, in a fresh interpreter (tracemalloc counts every
    thread of its process)."""
    from PIL import Image

    for i in range(1000):
        Image.new("RGB", (8, 6) if i % 2 else (6, 8), (i % 256, 0, 0)).save(tmp_path / f"p{i:04d}.png")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    peaks = {}
    for jobs in (10_000, 100_000):
        run = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path), str(jobs)], env=env,
                             capture_output=True, text=True, check=True)
        count, peaks[jobs] = map(int, run.stdout.split()[-2:])
        assert count == jobs
    assert peaks[100_000] <= 1.2 * peaks[10_000], peaks
