"""Two runs writing one job at once, with different settings: at the end its metadata describes the
image beside it (``jobs.finish`` checks after writing and writes again when the other run's image
landed in between). Local and on the S3 test server."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from stylize.catalog import metadata
from stylize.catalog.jobs import JobRunner, Prepared, finish, prepare
from stylize.catalog.manifest import Job
from stylize.catalog.storage import Storage
from stylize.engine.settings import Settings

DATA = Path(__file__).parent / "data"
FAST = {"size": 32, "scales": 1, "precision": "float32", "tolerance": 0}


class Scripted(Storage):
    """A Storage whose writes of job images and metadata happen in a scripted order across threads:
    ``order`` lists (thread name, kind) with kind ``pending``, ``image`` or ``metadata``; writes not
    (or no longer) in the script go ahead at once."""

    def __init__(self, order: list[tuple[str, str]], **options):
        super().__init__(**options)
        self.order = list(order)
        self.turn = threading.Condition()

    def write(self, uri, data, **kwargs):
        kind = "image" if uri.endswith(".png") else "pending" if b'"pending": true' in data else "metadata"
        me = (threading.current_thread().name, kind)
        with self.turn:
            scripted = me in self.order
            if scripted:
                assert self.turn.wait_for(lambda: self.order[0] == me, timeout=60), f"{me} waited for {self.order}"
        try:
            return super().write(uri, data, **kwargs)
        finally:
            if scripted:
                with self.turn:
                    self.order.pop(0)
                    self.turn.notify_all()


@pytest.fixture(scope="module")
def runner():
    return JobRunner("cpu")


def computed(runner: JobRunner, output: str, storage: Storage, iterations: int) -> tuple[Prepared, object]:
    """A job's prepared inputs and its picture at ``iterations``: another setting, another image."""
    job = Job(name="cat", content=str(DATA / "chelsea.png"), styles=(str(DATA / "starry_night.jpg"),),
              settings=Settings(iterations=iterations, **FAST), output=output, source="pairs[0]", index=0)
    prepared = prepare(job, storage)
    assert isinstance(prepared, Prepared), prepared
    return prepared, runner.compute(prepared)


# The schedule that paired one run's metadata with the other's image: B's image, then A's image and
# metadata, then B's metadata last.
INTERLEAVED = [("B", "pending"), ("B", "image"), ("A", "pending"), ("A", "image"), ("A", "metadata"),
               ("B", "metadata")]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_interleaved_runs_end_with_metadata_that_matches_the_image(runner, tmp_path, s3_server, bucket, where):
    output = str(tmp_path / "out") if where == "local" else f"s3://{bucket}/out"
    options = {} if where == "local" else {"endpoint_url": s3_server}
    storage = Scripted(INTERLEAVED, **options)
    runs = {"A": computed(runner, output, storage, 2), "B": computed(runner, output, storage, 4)}
    assert runs["A"][0].key != runs["B"][0].key
    threads = [threading.Thread(target=finish, name=name, args=(*runs[name], storage), kwargs={"thumbnails": False})
               for name in "AB"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert storage.order == [], "the script did not play out"
    meta = metadata.read_metadata(storage, f"{output}/cat.json")
    assert not meta.get("pending")
    assert metadata.image_matches(storage, f"{output}/cat.png", meta["output"])
    winner = next(name for name, (prepared, _) in runs.items() if prepared.key == meta["key"])
    assert metadata.is_complete(storage, runs[winner][0].job, meta["key"])
