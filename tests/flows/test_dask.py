"""The catalog flow on Dask: the same outputs as the default runner, and every job on a GPU resource."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from distributed import Client, Nanny, Scheduler, SpecCluster, WorkerPlugin

from flows.catalog import catalog_on_dask, stylize_catalog
from stylize.app.cli import main
from stylize.errors import ConfigError

DATA = Path(__file__).parent.parent / "data"
FAST = {"size": 32, "iterations": 2, "scales": 1, "precision": "float32"}

pytestmark = pytest.mark.slow


@pytest.fixture
def catalog(tmp_path) -> Path:
    """2 photos x 1 painting: 2 jobs."""
    root = tmp_path / "catalog"
    (root / "photos").mkdir(parents=True)
    shutil.copy(DATA / "chelsea.png", root / "photos" / "cat.png")
    shutil.copy(DATA / "astronaut.png", root / "photos" / "astronaut.png")
    shutil.copy(DATA / "starry_night.jpg", root)
    manifest = root / "manifest.yaml"
    manifest.write_text(
        f"version: 1\noutput: out\ndefaults: {json.dumps(FAST)}\n"
        "grid: {contents: [photos/], styles: [starry_night.jpg]}\n"
    )
    return manifest


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file() and "_runs" not in p.parts and "_thumbs" not in p.parts}


def test_local_cluster_gives_the_default_runners_outputs(catalog, tmp_path):
    # Each CPU worker of a local cluster gets an equal share of the cores. With the same
    # number of threads here, float32 reductions mostly run in the same order: the images agree
    # to the byte, the losses to rounding (after other tests in this process, not always to the
    # last bit). One image per VGG
    # pass on both: a padded batch agrees with solo runs only within tolerance
    # (tests/flows/test_batches.py), and this test is about where jobs run.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        default = stylize_catalog(manifest=str(catalog), output=str(tmp_path / "default"), images_per_batch=1)
    finally:
        torch.set_num_threads(threads)
    on_dask = catalog_on_dask("local", n_workers=2)(manifest=str(catalog), output=str(tmp_path / "dask"),
                                                    images_per_batch=1)

    assert default["counts"] == on_dask["counts"] == {"done": 2, "skipped": 0, "failed": 0, "total": 2}
    assert on_dask["devices"][0].startswith("dask tcp://127.0.0.1:")
    expected, got = files(tmp_path / "default"), files(tmp_path / "dask")
    assert set(got) == set(expected) == {"cat__starry_night.png", "cat__starry_night.json",
                                         "astronaut__starry_night.png", "astronaut__starry_night.json"}
    for name in ("cat__starry_night.png", "astronaut__starry_night.png"):
        assert got[name] == expected[name], f"{name} differs between the default runner and Dask"
    for name in ("cat__starry_night.json", "astronaut__starry_night.json"):
        a, b = json.loads(expected[name]), json.loads(got[name])
        del a["losses"]["seconds"], b["losses"]["seconds"]
        assert (a["key"], a["device"], a["losses"]["iteration"]) == (b["key"], b["device"], b["losses"]["iteration"])
        for part in ("total", "content", "style", "tv"):  # the last bits may differ (thread count, blocking)
            assert a["losses"][part] == pytest.approx(b["losses"][part], rel=1e-4), part


class TaskCount(WorkerPlugin):
    """Counts the tasks each worker finished."""

    name = "task-count"

    def setup(self, worker):
        self.finished = 0

    def transition(self, key, start, finish, **kwargs):
        if finish == "memory":
            self.finished += 1


@pytest.fixture
def cluster():
    """A scheduler on loopback with one worker that declares a GPU and one that declares none."""
    def worker(resources):
        return {"cls": Nanny, "options": {"nthreads": 1, "resources": resources, "host": "127.0.0.1"}}

    spec = {"gpu": worker({"GPU": 1}), "plain": worker({})}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    with SpecCluster(workers=spec, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.register_plugin(TaskCount())
        yield cluster.scheduler_address, client


def test_jobs_run_only_on_workers_with_a_gpu_resource(catalog, tmp_path, cluster):
    address, client = cluster
    summary = catalog_on_dask(address)(manifest=str(catalog), output=str(tmp_path / "out"))
    assert summary["counts"]["done"] == 2
    assert summary["devices"] == [f"dask {address}"]
    finished = client.run(lambda dask_worker: dask_worker.plugins["task-count"].finished)
    by_name = {client.scheduler_info()["workers"][addr]["name"]: n for addr, n in finished.items()}
    assert by_name == {"gpu": 2, "plain": 0}

    # Device slots belong to in-process runs: refused on Dask before any job starts.
    with pytest.raises(ConfigError, match="size the cluster instead"):
        catalog_on_dask(address)(manifest=str(catalog), devices=["cpu"])


@pytest.mark.parametrize(
    "address, n_workers, message",
    [
        ("tcp://127.0.0.1:8786", 2, "sizes a local Dask cluster only"),
        ("scheduler:8786", None, "expected 'local' or a URL like tcp://host:8786"),
        ("local", 0, "at least 1 worker"),
    ],
    ids=["workers-for-remote", "not-a-url", "no-workers"],
)
def test_bad_cluster_choices_are_refused(address, n_workers, message):
    with pytest.raises(ConfigError, match=message):
        catalog_on_dask(address, n_workers=n_workers)


def test_run_refuses_device_with_dask(catalog, capsys):
    assert main(["run", str(catalog), "--dask", "local", "--device", "cpu", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        "stylize: error: --device picks this machine's devices; with --dask each job runs on a worker's GPU\n"
    )
