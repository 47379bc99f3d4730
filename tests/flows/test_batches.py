"""Batches that fill and a window with no barrier, through the catalog flow on real small images."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image

import flows.catalog
from flows.catalog import CatalogFailed, stylize_catalog
from stylize.engine import images

DATA = Path(__file__).parent.parent / "data"
FAST = {"size": 32, "iterations": 3, "scales": 1, "precision": "float32"}


def crops(folder: Path, shapes: list[tuple[int, int]]) -> list[str]:
    """Photos p0, p1, ... cut from the cat photo at each (w, h) in turn, at different offsets."""
    cat = Image.open(DATA / "chelsea.png").convert("RGB")
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (w, h) in enumerate(shapes):
        cat.crop((7 * i, 5 * i, 7 * i + w, 5 * i + h)).save(folder / f"p{i}.png")
        names.append(f"p{i}")
    return names


def grid(root: Path, shapes: list[tuple[int, int]], styles=("starry_night.jpg",)) -> tuple[Path, list[str]]:
    names = crops(root / "photos", shapes)
    (root / "styles").mkdir()
    for style in styles:
        shutil.copy(DATA / style, root / "styles")
    manifest = root / "manifest.yaml"
    manifest.write_text(f"version: 1\noutput: out\ndefaults: {json.dumps(FAST)}\n"
                        f"grid:\n  contents: [photos/]\n  styles: [{', '.join('styles/' + s for s in styles)}]\n")
    return manifest, names


def meta(out: Path, job: str) -> dict:
    return json.loads((out / f"{job}.json").read_text())


def test_photos_of_one_shape_share_batches_however_far_apart_in_the_manifest(tmp_path):
    """Landscapes and portraits alternate in the manifest; each shape's four jobs share one batch,
    and each job's picture and losses are those it gets alone."""
    manifest, names = grid(tmp_path, [(120, 90), (90, 120)] * 4)
    alone = stylize_catalog(manifest=str(manifest), output=str(tmp_path / "alone"), images_per_batch=1)
    together = stylize_catalog(manifest=str(manifest), output=str(tmp_path / "together"), images_per_batch=4)
    assert alone["counts"]["done"] == together["counts"]["done"] == 8
    for i, name in enumerate(names):
        job = f"{name}__starry_night"
        a, b = meta(tmp_path / "alone", job), meta(tmp_path / "together", job)
        assert (a["engine"]["batch"], b["engine"]["batch"]) == (1, 4)
        assert a["engine"]["sizes"] == b["engine"]["sizes"] == [[32, 24] if i % 2 == 0 else [24, 32]]
        assert b["losses"]["total"][-1] == pytest.approx(a["losses"]["total"][-1], rel=0.02)
        pa, pb = (images.decode((tmp_path / run / f"{job}.png").read_bytes(), name=job) for run in ("alone", "together"))
        assert pa.size == pb.size
        assert (images.to_tensor(pa) - images.to_tensor(pb)).abs().mean() < 1 / 255, job
    for summary in (alone, together):
        assert summary["device_slots"] == 1
        assert 0 < summary["device_utilization"] <= 1
        # Both seconds are published to the millisecond and the ratio to 4 places; a run of under
        # a second moves the ratio of the published figures by up to 1e-3 / seconds.
        assert summary["device_utilization"] == pytest.approx(
            summary["engine_seconds"] / summary["seconds"], abs=1e-3 / summary["seconds"] + 1e-4)


def test_a_failing_job_in_a_mixed_batch_fails_alone(tmp_path):
    """A photo whose header gives its size but whose pixels are cut off is grouped with the others
    (4:3, 3:2 and 16:9 pad together); it fails, the other three finish together."""
    manifest, names = grid(tmp_path, [(120, 90), (120, 80), (120, 90), (128, 72)])
    bad = tmp_path / "photos" / f"{names[1]}.png"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(CatalogFailed) as err:
        stylize_catalog(manifest=str(manifest), images_per_batch=4)
    summary = err.value.summary
    assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 1, "total": 4}
    assert [f["job"] for f in summary["failures"]] == [f"{names[1]}__starry_night"]
    for name in (names[0], names[2], names[3]):
        assert meta(tmp_path / "out", f"{name}__starry_night")["engine"]["batch"] == 3


class InFlight:
    """Counts the jobs that have started (read their photo) and not yet finished (written their
    metadata, or failed), and the most at once, on a real Storage."""

    def __init__(self, storage, photos: str):
        self.now = self.most = 0
        self.lock = threading.Lock()
        read, write = storage.read, storage.write

        def counting_read(uri, *args, **kwargs):
            if uri.startswith(photos):
                self.change(+1)
            return read(uri, *args, **kwargs)

        def counting_write(uri, data, **kwargs):
            info = write(uri, data, **kwargs)
            if uri.endswith(".json") and "/_runs/" not in uri and b'"pending": true' not in data:
                self.change(-1)  # its metadata, complete (a pending one goes before the image)
            return info

        storage.read, storage.write = counting_read, counting_write

    def change(self, by: int) -> None:
        with self.lock:
            self.now += by
            self.most = max(self.most, self.now)


def test_the_window_keeps_at_most_its_bound_of_jobs_in_flight(tmp_path, monkeypatch):
    manifest, _ = grid(tmp_path, [(120, 90), (90, 120), (120, 80)] * 4)
    counters = []

    def instrumented(doc):
        storage = real(doc)
        counters.append(InFlight(storage, str(tmp_path / "photos")))
        return storage

    real = flows.catalog.storage_for
    monkeypatch.setattr(flows.catalog, "storage_for", instrumented)
    summary = stylize_catalog(manifest=str(manifest), images_per_batch=1, max_in_flight=3)
    assert summary["counts"]["done"] == 12
    (counter,) = counters
    assert counter.now == 0
    assert 2 <= counter.most <= 3  # reads start as soon as a job is submitted, before its device is free


def test_mixed_shapes_share_a_batch_and_each_gets_its_own_picture(tmp_path):
    """4:3, 3:2 and 16:9 photos pad together (they fill 0.94 of their 4:3 box); each job's output
    has the size it gets alone, and its picture and losses are those it gets alone."""
    manifest, names = grid(tmp_path, [(120, 90), (120, 80), (128, 72)] * 2)
    alone = stylize_catalog(manifest=str(manifest), output=str(tmp_path / "alone"), images_per_batch=1)
    together = stylize_catalog(manifest=str(manifest), output=str(tmp_path / "together"), images_per_batch=4)
    assert alone["counts"]["done"] == together["counts"]["done"] == 6
    sizes = [[32, 24], [32, 21], [32, 18]]
    batches = {}
    for i, name in enumerate(names):
        job = f"{name}__starry_night"
        a, b = meta(tmp_path / "alone", job), meta(tmp_path / "together", job)
        assert a["engine"]["sizes"] == b["engine"]["sizes"] == [sizes[i % 3]]
        batches[name] = (b["engine"]["batch"], b["engine"]["padded_sizes"])
        assert b["losses"]["total"][-1] == pytest.approx(a["losses"]["total"][-1], rel=0.02)
        pa, pb = (images.decode((tmp_path / run / f"{job}.png").read_bytes(), name=job) for run in ("alone", "together"))
        assert pa.size == pb.size == tuple(sizes[i % 3])
        assert (images.to_tensor(pa) - images.to_tensor(pb)).abs().mean() < 1 / 255, job
    # The two 4:3 and the two 3:2 photos fill one batch of 4 padded to 32x24; the 16:9 pair is left.
    assert [batches[n] for n in names] == [(4, [[32, 24]]), (4, [[32, 24]]), (2, [[32, 18]])] * 2
