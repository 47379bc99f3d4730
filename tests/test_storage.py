"""Storage against real local folders and a real S3-protocol server."""

from __future__ import annotations

import os
import pickle
import socket

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from stylize.errors import NotFoundError, StorageError, TransientStorageError
from stylize.catalog import metadata
from stylize.catalog.storage import (
    ObjectInfo, Storage, _s3_error, glob_regex, is_s3, join, output_root, parent, relative_to, split_glob,
)


@pytest.fixture
def storage(s3_server):
    return Storage(endpoint_url=s3_server)


# --- pure URI helpers -------------------------------------------------------


@pytest.mark.parametrize("uri, folder, pattern", [
    ("s3://b/photos/*/x*.jpg", "s3://b/photos/", "*/x*.jpg"),
    ("s3://b/*.png", "s3://b/", "*.png"),
    ("/data/a/**/*.jpg", "/data/a/", "**/*.jpg"),
])
def test_split_glob_lists_the_folder_before_the_first_pattern(uri, folder, pattern):
    assert split_glob(uri) == (folder, pattern)


@pytest.mark.parametrize("pattern, path, matches", [
    ("*.jpg", "a.jpg", True),
    ("*.jpg", "sub/a.jpg", False),          # * stays within one folder
    ("**/*.jpg", "sub/deeper/a.jpg", True),  # ** spans any depth
    ("**/*.jpg", "a.jpg", True),
    ("?.png", "ab.png", False),
    ("[!a]*.png", "b1.png", True),
    ("[!a]*.png", "a1.png", False),
    ("[^a].png", "^.png", True),             # a leading ^ is literal, as in fnmatch
])
def test_glob_regex(pattern, path, matches):
    assert bool(glob_regex(pattern).fullmatch(path)) is matches


def test_output_root_and_relative_to():
    assert output_root("s3://b/out/") == "s3://b/out"
    assert output_root("s3://b/") == "s3://b"
    assert relative_to("s3://b/photos/2026/a.jpg", "s3://b/photos") == "2026/a.jpg"
    assert relative_to("/data/photos/a/b.jpg", "/data/photos/") == "a/b.jpg"


@pytest.mark.parametrize(
    "base, relative, expected",
    [
        ("s3://b/manifests/", "styles/a.jpg", "s3://b/manifests/styles/a.jpg"),
        ("s3://b/manifests", "styles/a.jpg", "s3://b/manifests/styles/a.jpg"),
        ("s3://b/", "a.jpg", "s3://b/a.jpg"),
        ("s3://b/m/", "../s/./a.jpg", "s3://b/s/a.jpg"),
        ("s3://b/m/", "photos/", "s3://b/m/photos/"),
        ("s3://b/m/", "s3://other/x.png", "s3://other/x.png"),
        ("s3://b/m/", "/abs/x.png", "/abs/x.png"),
        ("/data/m", "a/../../b.png", "/data/b.png"),
        ("/data/m", "s3://b/x.png", "s3://b/x.png"),
        ("/data/m", "file:///tmp/x%20y.png", "/tmp/x y.png"),
        ("/data/m", "/abs/x.png", "/abs/x.png"),
    ],
)
def test_join(base, relative, expected):
    assert join(base, relative) == expected
    assert Storage().join(base, relative) == expected


def test_join_refuses_to_climb_above_the_bucket():
    with pytest.raises(StorageError, match="above the bucket root"):
        join("s3://b/m/", "../../x.png")


@pytest.mark.parametrize(
    "uri, expected",
    [("s3://b/a/m.yaml", "s3://b/a/"), ("s3://b/m.yaml", "s3://b/"), ("/x/y/m.yaml", "/x/y")],
)
def test_parent(uri, expected):
    assert parent(uri) == expected


def test_is_s3():
    assert is_s3("s3://b/k") and is_s3("S3://b/k")
    assert not is_s3("/tmp/s3://x") and not is_s3("file:///x")


def test_s3_uri_without_bucket_is_an_error():
    with pytest.raises(StorageError, match="no bucket name"):
        Storage().read("s3:///key")


# --- local ------------------------------------------------------------------


def test_local_roundtrip_creates_parents_and_leaves_no_temp_files(tmp_path):
    storage = Storage()
    target = tmp_path / "a" / "b" / "out.png"
    storage.write(str(target), b"one")
    storage.write(str(target), b"two!")  # replaces
    assert storage.read(str(target)) == b"two!"
    assert os.listdir(target.parent) == ["out.png"]
    assert storage.stat(str(target)) == ObjectInfo(uri=str(target), size=4, etag=None)
    assert storage.exists(f"file://{target}")
    # Written with the usual umask-based mode, not mkstemp's 0600.
    assert target.stat().st_mode & 0o044


def test_local_write_into_a_file_parent_fails_cleanly(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_bytes(b"x")
    with pytest.raises(StorageError, match="file.txt"):
        Storage().write(str(blocker / "sub" / "out.png"), b"data")
    assert os.listdir(tmp_path) == ["file.txt"]


def test_local_write_failing_at_rename_leaves_nothing(tmp_path):
    # The final name is a non-empty folder: the temp file is written, the
    # rename fails, and neither the temp file nor a partial output remain.
    target = tmp_path / "out.png"
    target.mkdir()
    (target / "keep").write_bytes(b"")
    with pytest.raises(StorageError, match="cannot write"):
        Storage().write(str(target), b"data")
    assert sorted(os.listdir(tmp_path)) == ["out.png"]
    assert target.is_dir()


def test_local_missing_and_folder(tmp_path):
    storage = Storage()
    with pytest.raises(NotFoundError, match=r"nope\.png: no such file"):
        storage.read(str(tmp_path / "nope.png"))
    with pytest.raises(StorageError, match="is a folder"):
        storage.read(str(tmp_path))
    assert storage.stat(str(tmp_path / "nope.png")) is None
    assert storage.stat(str(tmp_path)) is None  # a folder is not an object
    assert not storage.exists(str(tmp_path / "x" / "y.png"))


def test_local_list_is_recursive_and_ordered_like_s3(tmp_path):
    storage = Storage()
    for rel in ["b.png", "a/z.png", "a.jpg", "a/b/c.png", "c/.hidden"]:
        storage.write(str(tmp_path / rel), b"x")
    listed = [os.path.relpath(p, tmp_path) for p in storage.list(str(tmp_path))]
    assert listed == ["a.jpg", "a/b/c.png", "a/z.png", "b.png", "c/.hidden"]
    assert listed == sorted(listed)  # the order S3 lists the same keys in


def test_local_list_errors(tmp_path):
    with pytest.raises(NotFoundError, match="no such folder"):
        list(Storage().list(str(tmp_path / "missing")))
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(StorageError, match="expected a folder"):
        list(Storage().list(str(tmp_path / "f.png")))


# --- S3 ---------------------------------------------------------------------


def test_s3_roundtrip(storage, s3, bucket, image_bytes):
    data = image_bytes("png")
    uri = f"s3://{bucket}/out/x.png"
    storage.write(uri, data)
    assert storage.read(uri) == data
    info = storage.stat(uri)
    assert info.size == len(data) and info.etag and '"' not in info.etag
    assert s3.head_object(Bucket=bucket, Key="out/x.png")["ContentType"] == "image/png"
    storage.write(f"s3://{bucket}/m.json", b"{}", content_type="application/json")
    assert s3.head_object(Bucket=bucket, Key="m.json")["ContentType"] == "application/json"


def test_s3_large_write_uses_multipart(storage, s3, bucket):
    storage.multipart_threshold = 5 * 1024 * 1024  # S3's smallest part size
    data = os.urandom(11 * 1024 * 1024)
    uri = f"s3://{bucket}/big.bin"
    info = storage.write(uri, data)
    assert storage.read(uri) == data
    assert storage.stat(uri).etag.endswith("-2")  # a multipart ETag: <md5>-<parts>
    # Not the MD5 of the data, so the write returns the ETag that metadata records and a HEAD compares.
    assert info.etag == storage.stat(uri).etag
    assert metadata.image_matches(storage, uri, metadata.output_record(uri, data, info.etag))
    assert not metadata.image_matches(storage, uri, metadata.output_record(uri, data))  # the MD5 alone


def test_s3_missing_key_and_bucket(storage, bucket):
    with pytest.raises(NotFoundError, match=rf"s3://{bucket}/nope\.png: no such key"):
        storage.read(f"s3://{bucket}/nope.png")
    with pytest.raises(NotFoundError, match=r"s3://no-such-bucket-x1/k\.png: no such bucket 'no-such-bucket-x1'"):
        storage.read("s3://no-such-bucket-x1/k.png")
    with pytest.raises(NotFoundError, match="no such bucket"):
        storage.write("s3://no-such-bucket-x1/k.png", b"x")
    with pytest.raises(NotFoundError, match=r"s3://no-such-bucket-x1/p/: no such bucket"):
        list(storage.list("s3://no-such-bucket-x1/p/"))
    assert storage.stat(f"s3://{bucket}/nope.png") is None
    assert not storage.exists("s3://no-such-bucket-x1/k.png")


def test_s3_prefix_is_not_an_object(storage, bucket):
    with pytest.raises(StorageError, match="found a prefix"):
        storage.read(f"s3://{bucket}/folder/")


def test_s3_list_pages_lazily_past_1000_keys(storage, big_prefix):
    bucket, keys = big_prefix
    calls = []
    storage.client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    listing = storage.list(f"s3://{bucket}/catalog")  # no trailing slash: still the folder catalog/
    assert next(listing) == f"s3://{bucket}/{keys[0]}"
    assert len(calls) == 1  # one page fetched so far
    rest = list(listing)
    assert len(calls) == 2
    assert [f"s3://{bucket}/{k}" for k in keys[1:]] == rest


def test_s3_list_skips_folder_markers(storage, s3, bucket):
    for key in ["p/", "p/x.jpg", "p/sub/", "p/sub/y.jpg", "px.jpg"]:
        s3.put_object(Bucket=bucket, Key=key, Body=b"")
    assert list(storage.list(f"s3://{bucket}/p/")) == [f"s3://{bucket}/p/sub/y.jpg", f"s3://{bucket}/p/x.jpg"]
    assert list(storage.list(f"s3://{bucket}/empty/")) == []


def test_aws_endpoint_url_env_is_honoured(s3_server, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    storage = Storage()  # no explicit endpoint: botocore reads the environment
    storage.write(f"s3://{bucket}/env.txt", b"hi")
    assert storage.read(f"s3://{bucket}/env.txt") == b"hi"


def test_unreachable_endpoint_is_transient(s3_server):
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    storage = Storage(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1)
    with pytest.raises(TransientStorageError, match=r"s3://b-x/k\.png: EndpointConnectionError"):
        storage.read("s3://b-x/k.png")


def test_storage_pickles_without_its_client(storage, bucket):
    storage.write(f"s3://{bucket}/p.txt", b"x")  # client created
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.endpoint_url == storage.endpoint_url
    assert clone.read(f"s3://{bucket}/p.txt") == b"x"


def _client_error(code, status):
    return ClientError({"Error": {"Code": code, "Message": "msg"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize(
    "exc, kind, text",
    [
        (_client_error("NoSuchKey", 404), NotFoundError, "no such key"),
        (_client_error("404", 404), NotFoundError, "no such key"),
        (_client_error("NoSuchBucket", 404), NotFoundError, "no such bucket 'bkt'"),
        (_client_error("AccessDenied", 403), StorageError, "access denied (AccessDenied)"),
        (_client_error("403", 403), StorageError, "access denied"),
        (_client_error("SlowDown", 503), TransientStorageError, "SlowDown"),
        (_client_error("InternalError", 500), TransientStorageError, "InternalError"),
        (_client_error("Whatever", 502), TransientStorageError, "Whatever"),
        (_client_error("InvalidObjectState", 400), StorageError, "InvalidObjectState: msg"),
        (EndpointConnectionError(endpoint_url="http://x"), TransientStorageError, "EndpointConnectionError"),
        (ReadTimeoutError(endpoint_url="http://x"), TransientStorageError, "ReadTimeoutError"),
    ],
)
def test_s3_error_mapping(exc, kind, text):
    error = _s3_error(exc, "s3://bkt/key.png")
    assert type(error) is kind
    assert str(error).startswith("s3://bkt/key.png: ") and text in str(error)
