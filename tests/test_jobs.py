"""One job end to end without Prefect: a batch of photos of different shapes through JobRunner."""

import json
import shutil
from pathlib import Path

from PIL import Image

from stylize.catalog.jobs import JobRunner, finish, prepare
from stylize.catalog.manifest import load_manifest
from stylize.catalog.storage import Storage

DATA = Path(__file__).parent / "data"


def test_a_mixed_shape_batch_records_its_batch_and_padded_sizes(tmp_path):
    shutil.copy(DATA / "chelsea.png", tmp_path / "cat.png")
    Image.open(DATA / "chelsea.png").rotate(90, expand=True).save(tmp_path / "upright.png")
    shutil.copy(DATA / "starry_night.jpg", tmp_path / "starry.jpg")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("""
version: 1
output: out
defaults: {size: 32, iterations: 2, scales: 1, precision: float32}
grid: {contents: [cat.png, upright.png], styles: [starry.jpg]}
""")
    storage = Storage()
    prepared = [prepare(job, storage) for job in load_manifest(str(manifest)).jobs(storage)]
    runner = JobRunner("cpu")
    results = runner.compute_batch(prepared, storage=storage)
    outcomes = [finish(p, r, storage, thumbnails=False) for p, r in zip(prepared, results)]
    assert [o.status for o in outcomes] == ["done", "done"]
    metas = [json.loads(Path(p.metadata_uri).read_text())["engine"] for p in prepared]
    assert [m["sizes"] for m in metas] == [[[32, 21]], [[21, 32]]]
    assert [(m["batch"], m["padded_sizes"]) for m in metas] == [(2, [[32, 32]])] * 2
    assert [Image.open(p.image_uri).size for p in prepared] == [(32, 21), (21, 32)]
    # Each job's engine seconds are its share of the batch's.
    assert outcomes[0].engine_seconds == results[0].seconds / 2
