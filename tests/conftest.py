"""Shared fixtures: real collaborators in temp dirs, and a real S3-protocol server on loopback."""

from __future__ import annotations

import io
import os
import signal
import uuid

# Before torch loads (here and in every child process the tests start): OpenMP threads that spin
# while they wait take the core from the thread doing the work whenever anything else runs (a
# child run, the Prefect server, a loaded host). On 2 cores with load 4, a 64-channel 32 px
# convolution took 32 ms spinning and 0.6 ms sleeping; tests/test_precision.py and
# test_schedule.py took 259 s and 13 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The interrupt tests send SIGINT to the processes they start, as Ctrl+C would. A shell without job
# control starts `pytest &` with SIGINT ignored, and every child inherits that (an ignored signal
# stays ignored across exec), so they would never hear it. A handler here is reset to the default
# in each child at exec, where Python installs its own.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import boto3
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image

# Fake credentials and no user config: tests must never reach a real account.
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}
_AWS_UNSET = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of an S3-protocol server (moto) on 127.0.0.1, for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _AWS_ENV.items():
            mp.setenv(name, value)
        for name in _AWS_UNSET:
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3(s3_server):
    """A boto3 S3 client pointed at the test server."""
    return boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1")


@pytest.fixture
def bucket(s3):
    """A fresh, uniquely named bucket, so tests never see each other's objects."""
    name = f"stylize-test-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def image_bytes():
    """Factory: tiny encoded image bytes, e.g. ``image_bytes("png", color=(255, 0, 0))``."""

    def make(fmt: str = "png", size: tuple[int, int] = (8, 6), color=(200, 120, 40)) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", size, color).save(buffer, format={"jpg": "jpeg"}.get(fmt, fmt))
        return buffer.getvalue()

    return make


@pytest.fixture(scope="session")
def big_prefix(s3_server):
    """A bucket whose prefix ``catalog/`` holds 1,051 keys, more than one S3 listing page.

    Read-only, shared by the session (uploading takes seconds). Returns
    ``(bucket, keys)``: ``catalog/{a,b}/IMG_0000.jpg`` .. ``IMG_0524.jpg`` (same
    file names in two subfolders) and ``catalog/notes.txt``. Bodies are tiny
    and not images: listing and expansion never decode them.
    """
    from concurrent.futures import ThreadPoolExecutor

    client = boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1")
    name = f"stylize-big-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    keys = [f"catalog/{folder}/IMG_{i:04d}.jpg" for folder in "ab" for i in range(525)]
    keys.append("catalog/notes.txt")
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=name, Key=key, Body=b"x"), keys))
    return name, sorted(keys)
