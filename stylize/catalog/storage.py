"""Local files and S3 objects behind one small interface.

A URI is either ``s3://bucket/key``, ``file:///abs/path`` or a plain local
path. ``Storage`` routes each call by scheme, so the rest of the library never
asks where an image lives. Every failure becomes a ``StorageError`` whose
message names the URI: ``NotFoundError`` for a missing file, key or bucket,
``TransientStorageError`` for what a retry may fix (timeouts, throttling,
5xx), plain ``StorageError`` for the rest (access denied, bad URI).

Every URI helper lives here too: joining and parents, output roots, paths
relative to a listed folder, and the globs of manifest grids (``*`` and
``?`` within one folder, ``**`` across any depth).
"""

from __future__ import annotations

import io
import logging
import mimetypes
import os
import posixpath
import re
import secrets
import threading
from dataclasses import dataclass
from stat import S_ISREG
from typing import Iterator
from urllib.parse import unquote, urlparse

import boto3
import urllib3.exceptions
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore import exceptions as bex
from botocore.config import Config

from stylize.errors import Cancelled, NotFoundError, StorageError, TransientStorageError

log = logging.getLogger(__name__)

# S3 error codes that a later retry may fix. botocore's "standard" retry mode
# already retried these; if they still surface, the caller may retry the task.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequestsException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "PriorRequestNotComplete",
})
_DENIED_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem", "403",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})

#: Extensions of the files a listing counts as images (manifest grids, storage events).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ObjectInfo:
    """What ``Storage.stat`` knows about one file or object."""

    uri: str
    size: int
    etag: str | None  # the S3 ETag without quotes; None for local files


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri[:5].lower() == "s3://"


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; StorageError without a bucket."""
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r}: expected s3://bucket/key, found no bucket name")
    return bucket, key


def local_path(uri: str) -> str:
    """The absolute local path for a plain path or a ``file://`` URI."""
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(
                f"{uri!r}: expected file:///absolute/path, found host {parsed.netloc!r}"
            )
        return unquote(parsed.path)
    return os.path.abspath(os.path.expanduser(uri))


def is_listed_image(relative: str) -> bool:
    """True if a file found by listing, at ``relative`` below the listed folder, is an image.

    It needs an image extension, and no part of its path may start with a dot:
    macOS "._IMG.jpg" resource forks and ".thumbnails/" caches look like
    images but are not the catalog.
    """
    if not has_image_extension(relative):
        return False
    return not any(part.startswith(".") for part in relative.split("/"))


def parent(uri: str) -> str:
    """The folder (local) or prefix (S3, with a trailing ``/``) that holds ``uri``."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        head, _, _ = key.rstrip("/").rpartition("/")
        return f"s3://{bucket}/{head}/" if head else f"s3://{bucket}/"
    return os.path.dirname(local_path(uri))


def check_below(root: str, uri: str) -> None:
    """Refuse (StorageError) to write ``uri`` unless it lies below the output root ``root``.

    S3: ``uri`` must be in the same bucket, under the root's prefix. Local: its
    folder, with symbolic links resolved, must be inside the root's (the root
    itself may be a link): a link inside an output folder that points
    elsewhere would otherwise steer writes out of it. Checked before writing,
    so a folder replaced by a link after the check is not caught.
    """
    if is_s3(root) or is_s3(uri):
        prefix = root.rstrip("/") + "/"
        if not (is_s3(root) and uri.startswith(prefix)):
            raise StorageError(f"{uri}: outside the output root {root}; refusing to write there")
        return
    real_root = os.path.realpath(local_path(root))
    folder = os.path.dirname(local_path(uri))
    real = os.path.realpath(folder)
    if os.path.commonpath([real_root, real]) != real_root:
        raise StorageError(
            f"{uri}: folder {folder} resolves to {real}, outside the output root {real_root} "
            "(a symbolic link?); refusing to write there"
        )


def join(base: str, relative: str) -> str:
    """Resolve ``relative`` against the folder or prefix ``base``.

    ``s3://`` URIs, ``file://`` URIs and absolute local paths pass through
    (the latter two as plain absolute paths). Against an S3 base, ``.`` and
    ``..`` are resolved by hand so that keys are otherwise kept verbatim (S3
    keys may legitimately contain ``//``); escaping the bucket is an error.
    """
    if is_s3(relative):
        return relative
    if relative.startswith("file://"):
        return local_path(relative)
    relative = os.path.expanduser(relative)
    if os.path.isabs(relative):
        return os.path.normpath(relative)
    if is_s3(base):
        bucket, key = split_s3(base)
        prefix = key if not key or key.endswith("/") else key + "/"
        parts: list[str] = []
        for part in (prefix + relative).split("/"):
            if part == ".":
                continue
            if part == "..":
                if not parts:
                    raise StorageError(
                        f"{relative!r} relative to {base}: climbs above the bucket root"
                    )
                parts.pop()
            else:
                parts.append(part)
        return f"s3://{bucket}/" + "/".join(parts)
    return os.path.normpath(os.path.join(local_path(base), relative))


# --- output roots, listings and globs (the manifest's URI helpers) ------------------


def output_root(uri: str) -> str:
    """An output root, normalized: an absolute local path, or s3://bucket[/prefix] without a trailing /."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        key = key.strip("/")
        return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    return local_path(uri)


def child(root: str, name: str) -> str:
    """``name`` (a relative path with / separators) below the folder or prefix ``root``."""
    if is_s3(root):
        return f"{root.rstrip('/')}/{name}"
    return os.path.join(root, name)


def has_image_extension(uri: str) -> bool:
    """True if ``uri`` ends in one of ``IMAGE_EXTENSIONS`` (any case)."""
    return posixpath.splitext(uri)[1].lower() in IMAGE_EXTENSIONS


def relative_to(item: str, root: str) -> str:
    """``item``'s path below the folder or prefix ``root``, with / separators."""
    if is_s3(root):
        _, key = split_s3(root)
        prefix = key if not key or key.endswith("/") else key + "/"
        return split_s3(item)[1][len(prefix):]
    return os.path.relpath(item, local_path(root)).replace(os.sep, "/")


def is_glob(entry: str) -> bool:
    """True if ``entry`` has a glob character (``*``, ``?`` or ``[``)."""
    return any(c in entry for c in "*?[")


def split_glob(uri: str) -> tuple[str, str]:
    """``s3://b/photos/*/x*.jpg`` -> (``s3://b/photos/``, ``*/x*.jpg``): the folder to list, the pattern."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        head, rest = _split_at_glob(key)
        return f"s3://{bucket}/{head}", rest
    head, rest = _split_at_glob(uri)
    return head or "/", rest


def _split_at_glob(path: str) -> tuple[str, str]:
    """``a/b/*/c`` -> (``a/b/``, ``*/c``): the path before its first glob part, and the rest."""
    parts = path.split("/")
    k = next(i for i, part in enumerate(parts) if is_glob(part))
    head = "/".join(parts[:k])
    return (head + "/" if head else ""), "/".join(parts[k:])


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a glob: ``*`` and ``?`` stay within one folder, ``**`` spans any depth."""
    out = []
    parts = pattern.split("/")
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]*/)*")
            continue
        out.append(_glob_part(part) + ("" if last else "/"))
    return re.compile("".join(out))


def _glob_part(part: str) -> str:
    """The regex of one path part of a glob (no ``/`` inside)."""
    out, i = [], 0
    while i < len(part):
        c = part[i]
        end = part.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif end != -1:
            body = part[i + 1:end].replace("\\", "\\\\")
            # As in fnmatch: "[!...]" negates (never matching "/"), a leading "^" is literal.
            body = "^/" + body[1:] if body[0] == "!" else "\\" + body if body[0] == "^" else body
            out.append(f"[{body}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


class Storage:
    """Read, write, stat and list local paths and S3 objects.

    One boto3 client per instance, created on first S3 use (boto3 clients are
    thread-safe; creating them is not, hence the lock). Credentials come from
    boto3's standard chain; the endpoint from ``endpoint_url``, else from
    ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` (botocore reads those itself).
    """

    # Above this a write uses boto3's managed multipart upload: a single PUT
    # is limited to 5 GiB and cannot resume a failed part.
    multipart_threshold = 64 * 1024 * 1024

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 60.0,
        read_timeout: float = 60.0,
    ):
        self.endpoint_url = endpoint_url
        self.region = region
        # botocore "standard" mode retries throttling, 5xx and connection errors
        # with jittered backoff; 5 retries ride out a brief S3 brownout. (botocore's
        # max_attempts counts the retries after the first attempt.)
        self.max_attempts = max_attempts
        # Seconds per attempt (botocore's defaults). A stalled connection or
        # read fails after this long and is retried like any transient error;
        # tests against a stalling proxy set them to about a second.
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._lock = threading.Lock()
        self._client = None
        # Set by an interrupted run: from then on no request (first try or retry) is sent.
        self.cancel: threading.Event | None = None

    def __repr__(self) -> str:
        return f"Storage(endpoint_url={self.endpoint_url!r}, region={self.region!r})"

    # Task runners may pickle a Storage into workers: send the settings, not
    # the client or the lock, and let each process build its own client.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_client"] = None
        state["cancel"] = None  # an event belongs to this process's run
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self):
        """The boto3 S3 client, created on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    # A private session: boto3's default session is shared and
                    # not safe to create clients from concurrently.
                    session = boto3.session.Session()
                    self._client = session.client(
                        "s3",
                        endpoint_url=self.endpoint_url,
                        region_name=self.region,
                        config=Config(retries={"max_attempts": self.max_attempts, "mode": "standard"},
                                      connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                                      max_pool_connections=64),  # one per concurrent task, with room
                    )
                    # First in line, so an interrupted run neither sends a request nor sleeps
                    # before a retry that would be refused anyway.
                    events = self._client.meta.events
                    events.register_first("before-send.s3", self._no_send_when_cancelled)
                    events.register_first("needs-retry.s3", self._no_retry_when_cancelled)
        return self._client

    def _no_send_when_cancelled(self, request, **kwargs) -> None:
        """botocore hook: ``Cancelled`` instead of sending a request once ``cancel`` is set."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"{request.url.split('?')[0]}: not sent, the run was interrupted")

    def _no_retry_when_cancelled(self, request_dict, response=None, caught_exception=None, **kwargs) -> None:
        """botocore hook: ``Cancelled`` instead of a retry (and its backoff sleep) once ``cancel``
        is set; an answer that succeeded stands."""
        if isinstance(caught_exception, Cancelled):
            return None  # refused before sending: not retryable, so botocore raises it as it is
        failed = caught_exception is not None or (response is not None and response[0].status_code >= 300)
        if failed and self.cancel is not None and self.cancel.is_set():
            url = request_dict.get("url", "S3").split("?")[0]
            raise Cancelled(f"{url}: not retried, the run was interrupted") from caught_exception

    def read(self, uri: str) -> bytes:
        """The whole content of ``uri``; NotFoundError if it does not exist.

        A body cut short on S3 (fewer bytes than its Content-Length) raises
        TransientStorageError: the HTTP client checks the length, so a
        truncated image is never returned.
        """
        return self._read(uri, None)

    def read_head(self, uri: str, size: int) -> bytes:
        """The first ``size`` bytes of ``uri`` (all of it when shorter): enough for an image header.
        S3: one ranged GET. Errors as ``read``."""
        return self._read(uri, size)

    def _read(self, uri: str, size: int | None) -> bytes:
        """All of ``uri``, or its first ``size`` bytes."""
        if is_s3(uri):
            bucket, key = _object_key(uri)
            ranged = {} if size is None else {"Range": f"bytes=0-{size - 1}"}
            try:
                return self.client.get_object(Bucket=bucket, Key=key, **ranged)["Body"].read()
            except _S3_ERRORS as exc:
                raise _s3_error(exc, uri) from exc
        try:
            with open(local_path(uri), "rb") as f:
                return f.read() if size is None else f.read(size)
        except FileNotFoundError:
            raise NotFoundError(f"{uri}: no such file") from None
        except IsADirectoryError:
            raise StorageError(f"{uri}: is a folder, expected a file") from None
        except OSError as exc:
            raise StorageError(f"{uri}: cannot read: {exc.strerror or exc}") from exc

    def write(self, uri: str, data: bytes, *, content_type: str | None = None) -> ObjectInfo:
        """Write ``data`` to ``uri`` atomically: readers see the old or the new content.

        Local: a temporary file in the same folder, fsynced, then renamed over
        the target (parent folders are created). S3: a PUT is atomic by itself.
        Returns what was written: its size, and on S3 the ETag the store gave it
        (from the PUT's answer; after a multipart upload, from a HEAD).
        """
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"{uri}: not written, the run was interrupted")
        content_type = content_type or mimetypes.guess_type(uri)[0]
        if is_s3(uri):
            bucket, key = _object_key(uri)
            extra = {"ContentType": content_type} if content_type else {}
            try:
                if len(data) > self.multipart_threshold:
                    config = TransferConfig(multipart_threshold=self.multipart_threshold)
                    self.client.upload_fileobj(
                        io.BytesIO(data), bucket, key, ExtraArgs=extra, Config=config
                    )
                    etag = self.client.head_object(Bucket=bucket, Key=key).get("ETag")
                else:
                    etag = self.client.put_object(Bucket=bucket, Key=key, Body=data, **extra).get("ETag")
            except (*_S3_ERRORS, S3UploadFailedError) as exc:
                raise _s3_error(exc, uri) from exc
            return ObjectInfo(uri=uri, size=len(data), etag=(etag or "").strip('"') or None)
        _write_local(local_path(uri), data, uri)
        return ObjectInfo(uri=uri, size=len(data), etag=None)

    def probe(self, root: str) -> None:
        """Check that the output root ``root`` can be written: a tiny atomic write, then its delete.

        Run before any job, so an output that cannot be written (a read-only
        folder, a file where a folder should be, a missing bucket, access
        denied) fails the run at once: StorageError naming the root and the
        reason. Local folders the probe had to create are removed again.
        """
        uri = child(output_root(root), f".stylize.probe.{secrets.token_hex(6)}")
        created = [] if is_s3(uri) else _missing_folders(os.path.dirname(local_path(uri)))
        try:
            self.write(uri, b"stylize write probe\n", content_type="text/plain")
        except StorageError as exc:
            _remove_folders(created)
            reason = str(exc).removeprefix(f"{uri}: ")
            raise type(exc)(f"output {root}: cannot be written: {reason}") from exc
        try:
            self.delete(uri)
        except TransientStorageError:
            raise
        except StorageError as exc:  # a run never deletes (stale metadata is overwritten): a stray file
            log.warning("the write probe %s was left behind: %s", uri, exc)
        _remove_folders(created)

    def delete(self, uri: str) -> None:
        """Remove the file or object ``uri``; nothing happens if it does not exist."""
        if is_s3(uri):
            bucket, key = _object_key(uri)
            try:
                self.client.delete_object(Bucket=bucket, Key=key)  # S3 says 204 for a missing key too
            except _S3_ERRORS as exc:
                raise _s3_error(exc, uri) from exc
            return
        try:
            os.unlink(local_path(uri))
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            raise StorageError(f"{uri}: cannot delete: {exc.strerror or exc}") from exc

    def stat(self, uri: str) -> ObjectInfo | None:
        """Size (and ETag on S3) of ``uri``, or None if there is no such file or object."""
        if is_s3(uri):
            bucket, key = _object_key(uri)
            try:
                head = self.client.head_object(Bucket=bucket, Key=key)
            except _S3_ERRORS as exc:
                error = _s3_error(exc, uri)
                if isinstance(error, NotFoundError):
                    return None
                raise error from exc
            etag = (head.get("ETag") or "").strip('"') or None
            return ObjectInfo(uri=uri, size=int(head["ContentLength"]), etag=etag)
        try:
            st = os.stat(local_path(uri))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"{uri}: cannot stat: {exc.strerror or exc}") from exc
        if not S_ISREG(st.st_mode):
            return None  # a folder is not an object
        return ObjectInfo(uri=uri, size=st.st_size, etag=None)

    def exists(self, uri: str) -> bool:
        """True if ``uri`` is an existing file or object."""
        return self.stat(uri) is not None

    def list(self, prefix_uri: str) -> Iterator[str]:
        """Every file or object under the folder or prefix ``prefix_uri``, recursively.

        The argument is always taken as a folder: ``s3://b/photos`` lists
        ``photos/...``, not ``photos2/...``. Order is lexicographic by full
        key (local folders are walked in the same order S3 lists), and S3 is
        paged lazily, so a huge prefix costs one page of memory.
        NotFoundError (when iterated) for a missing folder or bucket.
        """
        if is_s3(prefix_uri):
            return self._list_s3(prefix_uri)
        return self._list_local(prefix_uri)

    def join(self, base: str, relative: str) -> str:
        """Resolve ``relative`` against the folder or prefix ``base`` (see ``join``)."""
        return join(base, relative)

    def _list_s3(self, prefix_uri: str) -> Iterator[str]:
        bucket, key = split_s3(prefix_uri)
        prefix = key if not key or key.endswith("/") else key + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", ()):
                    if not obj["Key"].endswith("/"):  # skip "folder" marker objects
                        yield f"s3://{bucket}/{obj['Key']}"
        except _S3_ERRORS as exc:
            raise _s3_error(exc, prefix_uri) from exc

    def _list_local(self, prefix_uri: str) -> Iterator[str]:
        root = local_path(prefix_uri)
        if not os.path.isdir(root):
            if os.path.exists(root):
                raise StorageError(f"{prefix_uri}: is a file, expected a folder")
            raise NotFoundError(f"{prefix_uri}: no such folder")
        yield from _walk(root, prefix_uri)


def _walk(folder: str, uri: str) -> Iterator[str]:
    try:
        with os.scandir(folder) as it:
            entries = [(e.name, e.path, e.is_dir(follow_symlinks=False)) for e in it]
    except OSError as exc:
        raise StorageError(f"{uri}: cannot list {folder}: {exc.strerror or exc}") from exc
    # Sort folders as "name/" so the order matches S3's listing of the same
    # tree ("a.jpg" before "a/x.jpg"); shard indices then agree across backends.
    entries.sort(key=lambda e: e[0] + "/" if e[2] else e[0])
    for _, path, is_dir in entries:
        if is_dir:  # symlinked folders are not followed: no cycles
            yield from _walk(path, uri)
        elif os.path.isfile(path):
            yield path


def _missing_folders(folder: str) -> list[str]:
    """The folders a write into ``folder`` would create, deepest first."""
    missing = []
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _remove_folders(folders: list[str]) -> None:
    """Remove the (empty) folders a probe created, deepest first."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            pass


def _write_local(path: str, data: bytes, uri: str) -> None:
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise StorageError(f"{uri}: cannot create folder {folder}: a file stands where a folder should be") from exc
    except OSError as exc:
        raise StorageError(f"{uri}: cannot create folder {folder}: {exc.strerror or exc}") from exc
    # Like mkstemp (unique name, O_EXCL) but mode 0o666 minus the umask,
    # where mkstemp's 0o600 would hide outputs from other users of a catalog.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        # A short name of its own, not the target's plus a suffix: any name that fits the
        # folder (up to 255 bytes) can then be written.
        tmp = os.path.join(folder, f".stylize.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise StorageError(f"{uri}: cannot write in {folder}: {exc.strerror or exc}") from exc
    done = False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename publishes it
        os.replace(tmp, path)
        done = True
    except OSError as exc:
        raise StorageError(f"{uri}: cannot write: {exc.strerror or exc}") from exc
    finally:
        if not done:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    # Make the rename itself durable; not every filesystem allows it.
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _object_key(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri}: expected s3://bucket/key naming an object, found a prefix")
    return bucket, key


_S3_ERRORS = (bex.ClientError, bex.BotoCoreError, urllib3.exceptions.HTTPError)


def _s3_error(exc: BaseException, uri: str) -> StorageError:
    """Map a boto3/botocore exception to our error classes, naming ``uri``.

    Messages carry the S3 error code, never request headers or credentials.
    """
    if isinstance(exc, S3UploadFailedError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, _S3_ERRORS):
            return _s3_error(cause, uri)
        return StorageError(f"{uri}: upload failed")
    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return NotFoundError(f"{uri}: no such bucket {split_s3(uri)[0]!r}")
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFoundError(f"{uri}: no such key")
        if code in _DENIED_CODES or status == 403:
            return StorageError(
                f"{uri}: access denied ({code or status}); check the AWS credentials "
                "and the bucket policy"
            )
        if code in _TRANSIENT_CODES or status == 429 or (status or 0) >= 500:
            return TransientStorageError(f"{uri}: S3 error {code or status} (transient, retry later)")
        message = error.get("Message") or "no message"
        return StorageError(f"{uri}: S3 error {code or status}: {message}")
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError, bex.CredentialRetrievalError)):
        return StorageError(
            f"{uri}: no usable AWS credentials ({type(exc).__name__}); set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        )
    if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError,
                        urllib3.exceptions.HTTPError)):
        return TransientStorageError(f"{uri}: {type(exc).__name__}: {exc}")
    return StorageError(f"{uri}: {type(exc).__name__}: {exc}")
