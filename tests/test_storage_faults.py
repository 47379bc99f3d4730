"""Storage against a misbehaving S3 endpoint: every fault is a clear, retryable error,
botocore's own retries absorb isolated faults, and a truncated body never passes as data."""

from __future__ import annotations

import time

import pytest
from faults import TRANSIENT, FaultProxy

from stylize.errors import TransientStorageError
from stylize.catalog.manifest import load_manifest, parse_manifest, storage_for
from stylize.catalog.storage import Storage

BODY = bytes(range(256)) * 40  # 10 KiB, so a truncated answer is visibly short


@pytest.fixture
def stored(s3, bucket):
    """``s3://bucket/k.bin`` holding BODY."""
    s3.put_object(Bucket=bucket, Key="k.bin", Body=BODY)
    return f"s3://{bucket}/k.bin"


def operations(storage: Storage, uri: str):
    return {
        "read": lambda: storage.read(uri),
        "write": lambda: storage.write(uri.replace("k.bin", "w.bin"), b"new"),
        "stat": lambda: storage.stat(uri),
        "delete": lambda: storage.delete(uri.replace("k.bin", "w.bin")),
    }


@pytest.mark.parametrize("op", ["read", "write", "stat", "delete"])
@pytest.mark.parametrize("kind", TRANSIENT)
def test_each_fault_is_a_transient_error_naming_the_uri(s3_server, stored, kind, op):
    with FaultProxy(s3_server, kinds=(kind,), limit=1) as proxy:
        # No botocore retries, and a short read timeout so a stall costs half a second.
        storage = Storage(endpoint_url=proxy.url, max_attempts=0, read_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(TransientStorageError) as error:
            operations(storage, stored)[op]()
    assert proxy.faults and proxy.faults[0][0] == kind
    assert str(error.value).startswith(stored.replace("k.bin", "w.bin") if op in ("write", "delete") else stored)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("kind", ["reset", "stall", "500"])  # 503 SlowDown: see test_catalog
def test_botocore_retries_ride_out_a_single_fault(s3_server, stored, kind):
    with FaultProxy(s3_server, kinds=(kind,), limit=4) as proxy:
        storage = Storage(endpoint_url=proxy.url, read_timeout=0.5)
        ops = operations(storage, stored)
        assert ops["read"]() == BODY
        ops["write"]()
        assert ops["stat"]().size == len(BODY)
        ops["delete"]()
    assert len(proxy.faults) == 4


def test_a_truncated_body_is_an_error_never_data(s3_server, stored):
    # The answer says 10240 bytes and ends cleanly after 5120: only the length check can tell.
    with FaultProxy(s3_server, kinds=("truncate",), methods=("GET",), limit=1) as proxy:
        storage = Storage(endpoint_url=proxy.url)
        with pytest.raises(TransientStorageError, match="IncompleteRead|ResponseStreamingError"):
            storage.read(stored)
        assert storage.read(stored) == BODY  # the retry (here: by hand, in a run: the task's) gets it all
    assert len(proxy.faults) == 1


def test_the_manifest_storage_block_tunes_retries_and_timeouts(tmp_path):
    manifest = parse_manifest(
        "version: 1\noutput: out\npairs: [{content: a.png, style: s.jpg}]\n"
        "storage: {endpoint_url: 'http://127.0.0.1:9', max_attempts: 1, connect_timeout: 0.5, read_timeout: 2}\n",
        str(tmp_path / "m.yaml"),
    )
    storage = storage_for(manifest)
    assert (storage.max_attempts, storage.connect_timeout, storage.read_timeout) == (1, 0.5, 2.0)
    assert storage.client.meta.config.read_timeout == 2.0
    defaults = storage_for(parse_manifest("version: 1\noutput: out\npairs: [{content: a.png, style: s.jpg}]\n",
                                          str(tmp_path / "m.yaml")))
    assert (defaults.max_attempts, defaults.read_timeout) == (Storage().max_attempts, Storage().read_timeout)


def test_temporary_files_left_by_a_killed_write_are_not_taken_for_images(tmp_path, image_bytes):
    # What a write killed before its rename leaves: ".stylize.<12 hex>.tmp" (storage._write_local), and the
    # longer names of earlier versions.
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.png").write_bytes(image_bytes("png"))
    (photos / ".cat.png.0123456789ab.tmp").write_bytes(image_bytes("png")[:20])
    (photos / ".stylize.89abcdef0123.tmp").write_bytes(image_bytes("png"))
    (tmp_path / "style.png").write_bytes(image_bytes("png"))
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("version: 1\noutput: out\ngrid: {contents: [photos/], styles: [style.png]}\n")
    assert [job.name for job in load_manifest(str(manifest)).jobs(Storage())] == ["cat__style"]


def test_a_cancelled_storage_sends_nothing_and_retries_nothing(s3_server, stored):
    import threading

    from stylize.errors import Cancelled

    with FaultProxy(s3_server, kinds=("stall",), methods=("GET",)) as proxy:
        storage = Storage(endpoint_url=proxy.url, read_timeout=0.5)  # botocore would retry 5 times
        storage.cancel = threading.Event()
        outcome: list[BaseException] = []

        def read():
            try:
                storage.read(stored)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        proxy.wait_for_fault(timeout=10)
        storage.cancel.set()  # the run is interrupted while the first attempt stalls
        reader.join(10)
        assert isinstance(outcome[0], Cancelled) and "not retried" in str(outcome[0])
        assert len(proxy.faults) == 1  # no retry went out
        with pytest.raises(Cancelled, match="not written"):
            storage.write(stored.replace("k.bin", "w.bin"), b"new")
        with pytest.raises(Cancelled, match="not sent"):
            storage.stat(stored)
        assert proxy.requests == 1
