"""The catalog flow never writes over an input or a stranger's file, fails before the compute when
its output cannot be written, and reruns a job whose image no longer matches its metadata; local
and on the loopback S3 server (issue 17, the write side)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.catalog import CatalogFailed, stylize_catalog
from stylize.catalog import metadata
from stylize.catalog.storage import Storage
from stylize.errors import NotFoundError, StorageError

DATA = Path(__file__).parent.parent / "data"
FAST = {"size": 32, "iterations": 2, "scales": 1, "precision": "float32"}
# A pair that writes over its own content (output: photos, name: a), and a pair that is fine.
PAIRS = """pairs:
  - {content: photos/a.png, style: s.jpg, name: a}
  - {content: photos/a.png, style: s.jpg, name: elsewhere/b}
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "photos").mkdir()
    shutil.copy(DATA / "chelsea.png", tmp_path / "photos" / "a.png")
    shutil.copy(DATA / "starry_night.jpg", tmp_path / "s.jpg")
    return tmp_path


def manifest(folder: Path, output: str, body: str, settings: dict | None = None) -> str:
    path = folder / "manifest.yaml"
    path.write_text(f"version: 1\noutput: {output}\ndefaults: {json.dumps(settings or FAST)}\n{body}")
    return str(path)


def upload(s3, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="photos/a.png", Body=(DATA / "chelsea.png").read_bytes())
    s3.put_object(Bucket=bucket, Key="s.jpg", Body=(DATA / "starry_night.jpg").read_bytes())


def test_a_pair_writing_over_its_content_fails_alone_local(folder):
    photo = (folder / "photos" / "a.png").read_bytes()
    with pytest.raises(CatalogFailed):
        stylize_catalog(manifest=manifest(folder, "photos", PAIRS))
    assert (folder / "photos" / "a.png").read_bytes() == photo
    assert not (folder / "photos" / "a.json").exists()
    assert (folder / "photos" / "elsewhere" / "b.json").is_file()  # the other job ran
    [summary] = [json.loads(p.read_text()) for p in (folder / "photos" / "_runs").glob("*.json")]
    [failure] = summary["failures"]
    assert failure["kind"] == "OverwriteError" and failure["error"].startswith("pairs[0]: output image ")


def test_a_pair_writing_over_its_content_fails_alone_s3(folder, s3, bucket, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    upload(s3, bucket)
    body = PAIRS.replace("photos/a.png", f"s3://{bucket}/photos/a.png").replace("s.jpg", f"s3://{bucket}/s.jpg")
    with pytest.raises(CatalogFailed):
        stylize_catalog(manifest=manifest(folder, f"s3://{bucket}/photos", body))
    assert s3.get_object(Bucket=bucket, Key="photos/a.png")["Body"].read() == (DATA / "chelsea.png").read_bytes()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert "photos/a.json" not in keys and "photos/elsewhere/b.json" in keys


def test_an_image_replaced_behind_a_done_job_is_recomputed_local(folder):
    uri = manifest(folder, "out", "pairs: [{content: photos/a.png, style: s.jpg, name: a}]\n")
    assert stylize_catalog(manifest=uri)["counts"]["done"] == 1
    image = folder / "out" / "a.png"
    stylized = image.read_bytes()
    image.write_bytes(bytes(reversed(stylized)))  # same size, other bytes
    assert stylize_catalog(manifest=uri)["counts"] == {"done": 1, "skipped": 0, "failed": 0, "total": 1}
    assert image.read_bytes() == stylized  # deterministic on the CPU: the same picture again
    assert stylize_catalog(manifest=uri)["counts"]["skipped"] == 1


def test_an_image_replaced_behind_a_done_job_is_recomputed_s3(folder, s3, bucket, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    upload(s3, bucket)
    uri = manifest(folder, f"s3://{bucket}/out",
                   f"pairs: [{{content: s3://{bucket}/photos/a.png, style: s3://{bucket}/s.jpg, name: a}}]\n")
    assert stylize_catalog(manifest=uri)["counts"]["done"] == 1
    stylized = s3.get_object(Bucket=bucket, Key="out/a.png")["Body"].read()
    s3.put_object(Bucket=bucket, Key="out/a.png", Body=bytes(reversed(stylized)))
    assert stylize_catalog(manifest=uri)["counts"]["done"] == 1
    meta = json.loads(s3.get_object(Bucket=bucket, Key="out/a.json")["Body"].read())
    assert metadata.image_matches(Storage(), f"s3://{bucket}/out/a.png", meta["output"])
    assert stylize_catalog(manifest=uri)["counts"]["skipped"] == 1


@pytest.mark.parametrize("where", ["file", "bucket"])
def test_an_output_that_cannot_be_written_fails_before_any_job(folder, s3_server, monkeypatch, where):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    (folder / "taken").write_text("a file where the output folder should be")
    output = str(folder / "taken") if where == "file" else "s3://no-such-bucket-w17/out"
    uri = manifest(folder, output, "pairs: [{content: photos/a.png, style: s.jpg, name: a}]\n")
    state = stylize_catalog(manifest=uri, return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, NotFoundError if where == "bucket" else StorageError)
    assert str(error).startswith(f"output {output}: cannot be written: ")
    assert (folder / "taken").read_text() == "a file where the output folder should be"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_with_different_settings_at_once_leave_every_metadata_matching_its_image(
        tmp_path, s3, bucket, s3_server, where):
    from faults import cli_env, start_run

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea.png", "astronaut.png", "shipwreck.jpg"):
        shutil.copy(DATA / name, photos / name)
    shutil.copy(DATA / "starry_night.jpg", tmp_path / "s.jpg")
    output = str(tmp_path / "out") if where == "local" else f"s3://{bucket}/out"
    storage = f'storage: {{endpoint_url: "{s3_server}", region: us-east-1}}\n' if where == "s3" else ""
    uri = manifest(tmp_path, output, f"{storage}grid: {{contents: [photos/], styles: [s.jpg]}}\n")
    runs = [start_run(uri, cli_env(tmp_path / f"prefect{i}"), "--iterations", str(i), log=tmp_path / f"run{i}.log")
            for i in (2, 3)]
    for i, process in zip((2, 3), runs):
        assert process.wait(300) == 0, (tmp_path / f"run{i}.log").read_text()[-3000:]
    store = Storage(endpoint_url=s3_server if where == "s3" else None)
    names = [uri for uri in store.list(output) if uri.endswith(".json") and "/_runs/" not in uri]
    assert len(names) == 3
    for uri in names:
        meta = metadata.read_metadata(store, uri)
        assert not meta.get("pending") and meta["settings"]["iterations"] in (2, 3), uri
        assert metadata.image_matches(store, uri.removesuffix(".json") + ".png", meta["output"]), uri
