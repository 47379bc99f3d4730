"""The catalog flow end to end on real small images, over local folders and loopback S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from faults import FaultProxy

from flows.catalog import CatalogFailed, stylize_catalog
from flows.devices import runner_for
from stylize.app.cli import main

DATA = Path(__file__).parent.parent / "data"
FAST = {"size": 32, "iterations": 2, "scales": 1, "precision": "float32"}


def write_manifest(folder: Path, body: str) -> Path:
    path = folder / "manifest.yaml"
    path.write_text(body)
    return path


@pytest.fixture
def catalog(tmp_path):
    """A manifest folder with 2 photos and 2 paintings: 4 jobs."""
    root = tmp_path / "catalog"
    (root / "photos").mkdir(parents=True)
    (root / "styles").mkdir()
    shutil.copy(DATA / "chelsea.png", root / "photos" / "cat.png")
    shutil.copy(DATA / "astronaut.png", root / "photos" / "astronaut.png")
    shutil.copy(DATA / "starry_night.jpg", root / "styles")
    shutil.copy(DATA / "shipwreck.jpg", root / "styles")
    manifest = write_manifest(root, f"""
version: 1
output: out
defaults: {json.dumps(FAST)}
grid:
  contents: [photos/]
  styles: [styles/starry_night.jpg, styles/shipwreck.jpg]
""")
    return manifest


def outputs(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and "_runs" not in p.parts and "_thumbs" not in p.parts}


def test_local_catalog_then_rerun_skips_everything(catalog):
    out = catalog.parent / "out"
    summary = stylize_catalog(manifest=str(catalog))
    assert summary["counts"] == {"done": 4, "skipped": 0, "failed": 0, "total": 4}
    names = {f"{c}__{s}" for c in ("cat", "astronaut") for s in ("starry_night", "shipwreck")}
    assert outputs(out) == {f"{n}.png" for n in names} | {f"{n}.json" for n in names}
    meta = json.loads((out / "cat__shipwreck.json").read_text())
    assert meta["schema"] == "stylize.catalog.metadata/v1"
    assert meta["losses"]["iteration"] == [0, 1, 2]
    run_summary = json.loads((out / "_runs" / f"{summary['flow_run_id']}.json").read_text())
    assert run_summary["counts"]["done"] == 4

    runner_for.cache_clear()
    again = stylize_catalog(manifest=str(catalog))
    assert again["counts"] == {"done": 0, "skipped": 4, "failed": 0, "total": 4}
    assert not runner_for("cpu").engine._models  # no model was loaded for skipped jobs

    # A changed setting reruns the jobs.
    changed = stylize_catalog(manifest=str(catalog), settings={"iterations": 3})
    assert changed["counts"]["done"] == 4


def test_bad_inputs_fail_their_jobs_and_the_rest_finish(catalog, capsys):
    root = catalog.parent
    (root / "photos" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    manifest = write_manifest(root, f"""
version: 1
output: out
defaults: {json.dumps(FAST)}
pairs:
  - content: photos/cat.png
    style: styles/starry_night.jpg
  - content: photos/corrupt.png
    style: styles/starry_night.jpg
  - content: photos/missing.jpg
    style: styles/starry_night.jpg
""")
    with pytest.raises(CatalogFailed) as err:
        stylize_catalog(manifest=str(manifest))
    summary = err.value.summary
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 2, "total": 3}
    failures = {f["job"]: f["error"] for f in summary["failures"]}
    assert "corrupt" in failures["corrupt__starry_night"]
    assert "missing.jpg" in failures["missing__starry_night"] and "no such file" in failures["missing__starry_night"]
    assert (root / "out" / "cat__starry_night.png").is_file()
    assert not (root / "out" / "corrupt__starry_night.json").exists()

    # Through the CLI: exit 1, both failures printed with their messages.
    capsys.readouterr()
    assert main(["run", str(manifest), "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "corrupt__starry_night" in printed and "missing__starry_night" in printed

    # A threshold lets the flow run succeed while the CLI still reports the failures.
    summary = stylize_catalog(manifest=str(manifest), max_failures=2)
    assert summary["counts"]["failed"] == 2


def test_invalid_manifest_exits_2(tmp_path, capsys):
    bad = write_manifest(tmp_path, "version: 2\noutput: out\npairs: []\nbogus: 1\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "version" in err and "bogus" in err


def test_shards_cover_the_catalog_exactly_once(catalog):
    out = catalog.parent / "out"
    first = stylize_catalog(manifest=str(catalog), shard="0/2")
    second = stylize_catalog(manifest=str(catalog), shard="1/2")
    assert first["counts"]["done"] + second["counts"]["done"] == 4
    assert first["counts"]["done"] == 2
    assert len([p for p in outputs(out) if p.endswith(".png")]) == 4
    both = stylize_catalog(manifest=str(catalog))
    assert both["counts"]["skipped"] == 4


def upload_catalog(s3, bucket: str) -> str:
    for local, key in [("chelsea.png", "in/photos/cat.png"), ("astronaut.png", "in/photos/astronaut.png"),
                       ("starry_night.jpg", "in/styles/starry.jpg")]:
        s3.put_object(Bucket=bucket, Key=key, Body=(DATA / local).read_bytes())
    return "in/"


def s3_manifest(s3, bucket, endpoint, output=None) -> str:
    upload_catalog(s3, bucket)
    body = f"""
version: 1
output: {output or f's3://{bucket}/out'}
storage: {{endpoint_url: "{endpoint}", region: us-east-1}}
defaults: {json.dumps(FAST)}
grid:
  contents: [photos/]
  styles: [styles/starry.jpg]
"""
    s3.put_object(Bucket=bucket, Key="in/manifest.yaml", Body=body.encode())
    return f"s3://{bucket}/in/manifest.yaml"


def test_s3_catalog_writes_back_and_reruns_skip(s3, bucket, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # to read the manifest itself
    uri = s3_manifest(s3, bucket, s3_server)
    summary = stylize_catalog(manifest=uri)
    assert summary["counts"]["done"] == 2
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert {"out/cat__starry.png", "out/cat__starry.json", "out/astronaut__starry.png",
            "out/astronaut__starry.json"} <= keys
    assert any(k.startswith("out/_runs/") for k in keys)
    assert stylize_catalog(manifest=uri)["counts"]["skipped"] == 2


def test_transient_s3_failures_are_retried(s3, bucket, s3_server, monkeypatch):
    # More consecutive 503s than botocore's own retries absorb, so the task-level retry must act too.
    # Job writes only (the output probe is retried by its own task, test_output_probe).
    with FaultProxy(s3_server, kinds=("503",), methods=("PUT",), path=r"\.(png|jpg|json)$", limit=6) as proxy:
        # The manifest is read through the proxy too: a manifest read from S3 may name only the
        # endpoint it was read from.
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        uri = s3_manifest(s3, bucket, proxy.url)
        summary = stylize_catalog(manifest=uri)
    assert len(proxy.faults) == 6
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 0, "total": 2}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert {"out/cat__starry.png", "out/astronaut__starry.png"} <= keys


def test_batched_jobs_match_unbatched(catalog, tmp_path):
    """images_per_batch changes how jobs share the device, not the pictures."""
    from PIL import Image

    from stylize.engine import images

    # A second photo of the cat's size, so that two jobs per style share one VGG19 batch.
    Image.open(DATA / "chelsea.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(catalog.parent / "photos" / "cat2.png")
    alone = stylize_catalog(manifest=str(catalog), output=str(tmp_path / "alone"))
    together = stylize_catalog(manifest=str(catalog), output=str(tmp_path / "together"), images_per_batch=3)
    assert alone["counts"]["done"] == together["counts"]["done"] == 6
    for png in sorted((tmp_path / "alone").glob("*.png")):
        a = images.to_tensor(images.decode(png.read_bytes(), name=str(png)))
        b_path = tmp_path / "together" / png.name
        b = images.to_tensor(images.decode(b_path.read_bytes(), name=str(b_path)))
        assert (a - b).abs().mean() < 1 / 255, png.name
