"""Metadata documents, job keys, and the completeness check (local and S3)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import stylize
from stylize.catalog.manifest import Job
from stylize.catalog.metadata import (SCHEMA, build_metadata, encode, is_complete, job_key, output_record,
                                     pending_metadata, read_metadata, sha256)
from stylize.engine.settings import Settings
from stylize.catalog.storage import Storage


@dataclass
class Record:  # the shape of stylize.engine.optimize.Record
    iteration: int
    scale: int
    total: float
    content: float
    style: float
    tv: float
    seconds: float


STARTED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def make_job(output: str, **settings) -> Job:
    return Job(
        name="a/cat__starry_night", content=f"{output}/in/cat.jpg", styles=(f"{output}/in/starry.jpg",),
        settings=Settings(**settings), output=output, source="grid.contents[0]", index=0,
    )


def key_for(job: Job, content: bytes, style: bytes) -> str:
    return job_key(sha256(content), [sha256(style)], job.settings, stylize.__version__)


def finish(storage: Storage, job: Job, key: str, image: bytes) -> dict:
    """Write the image and its metadata as a finished job would."""
    info = storage.write(job.image_uri, image)
    meta = build_metadata(
        job=job, key=key,
        inputs={"content": {"uri": job.content, "sha256": "c" * 64, "size": 10},
                "styles": [{"uri": job.styles[0], "sha256": "s" * 64, "size": 20}]},
        output=output_record(job.image_uri, image, info.etag), device="cpu",
        versions={"stylize": stylize.__version__}, started=STARTED,
        finished=STARTED + timedelta(seconds=1.5), records=[Record(0, 0, 3.0, 1.0, 1.5, 0.5, 0.1)],
    )
    storage.write(job.metadata_uri, encode(meta), content_type="application/json")
    return meta


def test_sha256():
    assert sha256(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_job_key_depends_on_everything_that_decides_the_picture():
    base = job_key("c", ["s1", "s2"], Settings(), "0.1.0")
    assert base == job_key("c", ("s1", "s2"), Settings(), "0.1.0")  # deterministic, any sequence
    assert len(base) == 64 and int(base, 16) >= 0
    others = {
        job_key("c2", ["s1", "s2"], Settings(), "0.1.0"),
        job_key("c", ["s2", "s1"], Settings(), "0.1.0"),  # order matters: blend weights are positional
        job_key("c", ["s1", "s2"], Settings(iterations=10), "0.1.0"),
        job_key("c", ["s1", "s2"], Settings(), "0.2.0"),
    }
    assert base not in others and len(others) == 4


def test_build_metadata_document():
    job = make_job("/out", size=256)
    records = [
        Record(0, 0, 10.0, 4.0, 5.0, 1.0, 0.25),
        {"iteration": 1, "scale": 1, "total": float("nan"), "content": 3.0, "style": float("inf"), "tv": 0.5, "seconds": 0.5},
    ]
    naive_start = datetime(2026, 3, 1, 12, 0, 0)  # naive: taken as UTC
    finished = datetime(2026, 3, 1, 13, 0, 2, 500000, tzinfo=timezone(timedelta(hours=1)))
    meta = build_metadata(
        job=job, key="k" * 64, inputs={"content": {"uri": "c", "sha256": "x", "size": 1}, "styles": [{"uri": "s", "sha256": "y", "size": 2}]},
        output=output_record(job.image_uri, b"x" * 123), device="cuda:0", versions={"torch": "2.4"},
        started=naive_start, finished=finished, records=records,
    )
    assert meta["schema"] == SCHEMA and meta["job"] == "a/cat__starry_night" and meta["key"] == "k" * 64
    assert meta["settings"] == job.settings.model_dump(mode="json") and meta["settings"]["size"] == 256
    assert meta["output"] == {"uri": "/out/a/cat__starry_night.png", "size": 123, "sha256": sha256(b"x" * 123),
                              "md5": "61bed25f0c0c3f35c30a105ae12e96ef"}
    assert meta["inputs"]["styles"][0]["size"] == 2
    assert (meta["device"], meta["versions"]) == ("cuda:0", {"torch": "2.4"})
    assert meta["started"] == "2026-03-01T12:00:00Z" and meta["finished"] == "2026-03-01T12:00:02.500000Z"
    assert meta["seconds"] == 2.5
    assert meta["losses"] == {
        "iteration": [0, 1], "scale": [0, 1], "total": [10.0, None], "content": [4.0, 3.0],
        "style": [5.0, None], "tv": [1.0, 0.5], "seconds": [0.25, 0.5],
    }
    assert json.loads(encode(meta)) == meta  # valid JSON: NaN became null


def test_read_metadata_absent_or_corrupt(tmp_path):
    storage = Storage()
    assert read_metadata(storage, str(tmp_path / "none.json")) is None
    for bad in [b"{\"schema\": ", b"[1, 2]", b"\xff\xfe", b""]:
        (tmp_path / "bad.json").write_bytes(bad)
        assert read_metadata(storage, str(tmp_path / "bad.json")) is None
    (tmp_path / "ok.json").write_bytes(b'{"schema": "x"}')
    assert read_metadata(storage, str(tmp_path / "ok.json")) == {"schema": "x"}


def check_completeness(storage: Storage, output: str, image: bytes) -> None:
    job = make_job(output)
    key = key_for(job, b"content", b"style")
    assert not is_complete(storage, job, key)  # nothing written yet
    finish(storage, job, key, image)
    assert read_metadata(storage, job.metadata_uri)["output"]["size"] == len(image)
    assert is_complete(storage, job, key)

    changed = make_job(output, iterations=42)  # same name, new settings: a new key
    assert not is_complete(storage, changed, key_for(changed, b"content", b"style"))
    assert not is_complete(storage, job, key_for(job, b"other content", b"style"))

    storage.write(job.image_uri, image + b"truncated?")  # not the image the metadata describes
    assert not is_complete(storage, job, key)
    finish(storage, job, key, image)
    swapped = bytes(reversed(image))  # same size, other bytes: only the checksum tells
    storage.write(job.image_uri, swapped)
    assert not is_complete(storage, job, key)
    storage.write(job.image_uri, image)  # the very image again (a new S3 object, the same bytes)
    assert is_complete(storage, job, key)

    meta = read_metadata(storage, job.metadata_uri)
    legacy = {**meta, "output": {"uri": meta["output"]["uri"], "size": meta["output"]["size"]}}
    storage.write(job.metadata_uri, encode(legacy))  # metadata without a checksum proves nothing
    assert not is_complete(storage, job, key)
    storage.write(job.metadata_uri, encode(pending_metadata(job.name, job.image_uri)))
    assert not is_complete(storage, job, key)

    finish(storage, job, key, image)
    meta = read_metadata(storage, job.metadata_uri)
    storage.write(job.metadata_uri, encode({**meta, "schema": "stylize.catalog.metadata/v0"}))
    assert not is_complete(storage, job, key)
    storage.write(job.metadata_uri, b'{"schema": "stylize.catalog.metadata/v1", "key": "')  # half-written
    assert not is_complete(storage, job, key)


def test_is_complete_local(tmp_path, image_bytes):
    storage = Storage()
    check_completeness(storage, str(tmp_path / "out"), image_bytes("png"))
    job = make_job(str(tmp_path / "out"))
    key = key_for(job, b"content", b"style")
    finish(storage, job, key, image_bytes("png"))
    (tmp_path / "out" / "a" / "cat__starry_night.png").unlink()  # image missing
    assert not is_complete(storage, job, key)


class HeadOnly(Storage):
    """A Storage that refuses to read images: the completeness check must not download them."""

    def read(self, uri: str) -> bytes:
        assert not uri.endswith(".png"), f"downloaded {uri}"
        return super().read(uri)


def test_is_complete_s3(s3_server, s3, bucket, image_bytes):
    storage = HeadOnly(endpoint_url=s3_server)
    check_completeness(storage, f"s3://{bucket}/catalog", image_bytes("png"))
    job = make_job(f"s3://{bucket}/catalog")
    key = key_for(job, b"content", b"style")
    finish(storage, job, key, image_bytes("png"))
    assert s3.head_object(Bucket=bucket, Key="catalog/a/cat__starry_night.json")["ContentType"] == "application/json"
    s3.delete_object(Bucket=bucket, Key="catalog/a/cat__starry_night.png")  # image missing
    assert not is_complete(storage, job, key)


def test_a_catalog_copied_to_s3_is_complete_by_its_md5(tmp_path, s3_server, s3, bucket, image_bytes):
    local, image = make_job(str(tmp_path / "out")), image_bytes("png")
    key = key_for(local, b"content", b"style")
    finish(Storage(), local, key, image)
    assert "etag" not in read_metadata(Storage(), local.metadata_uri)["output"]  # a local file has none
    for name in ("a/cat__starry_night.png", "a/cat__starry_night.json"):  # a plain copy, as `aws s3 sync` does
        s3.put_object(Bucket=bucket, Key=f"catalog/{name}", Body=(tmp_path / "out" / name).read_bytes())
    assert is_complete(HeadOnly(endpoint_url=s3_server), make_job(f"s3://{bucket}/catalog"), key)
