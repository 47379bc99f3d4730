"""The JSON written next to every output image, and the key that decides reruns.

A job is complete when ``<name>.json`` exists with this schema, its key equals
the key the job would have now, and the image beside it is the one it
describes: the recorded size, and the recorded checksum, compared without
downloading the image (S3: the ETag of a HEAD against the ETag the PUT
returned, or the MD5, which is the ETag of a plain single-part upload;
local: the SHA-256 of the file, local reads being cheap). An image replaced
behind the catalog's back, or by a concurrent run, makes its job incomplete,
so it runs again. The key hashes the input images' bytes, the resolved
settings and the engine version, so changing any of them reruns the job while
renaming or moving an input does not.

A job first writes a *pending* document (``pending: true``, naming the image
it is about to write), then the image, then the full document. So a sidecar
of this schema beside an image says that stylize wrote that image, even after
a crash between the two, and it never claims an image it does not match.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from stylize.catalog.storage import is_s3
from stylize.errors import NotFoundError
from stylize.engine.settings import Settings

if TYPE_CHECKING:
    from stylize.catalog.manifest import Job
    from stylize.catalog.storage import Storage

SCHEMA = "stylize.catalog.metadata/v1"
# Per-iteration loss columns, in the order of stylize.engine.optimize.Record's fields.
LOSS_COLUMNS = ("iteration", "scale", "total", "content", "style", "tv", "seconds")


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def output_record(uri: str, data: bytes, etag: str | None = None) -> dict[str, Any]:
    """The metadata's ``output``: where the image went and what proves it is that image."""
    record = {"uri": uri, "size": len(data), "sha256": sha256(data),
              "md5": hashlib.md5(data, usedforsecurity=False).hexdigest()}
    if etag is not None:
        record["etag"] = etag  # what the store calls this object: a HEAD compares it, no download
    return record


def pending_metadata(name: str, image_uri: str) -> dict[str, Any]:
    """The document a job writes before its image: not complete, but it claims the image's name."""
    return {"schema": SCHEMA, "job": name, "pending": True, "output": {"uri": image_uri}}


def is_stylize_metadata(document: Any) -> bool:
    """True if ``document`` (parsed JSON) is a metadata file stylize wrote, complete or pending."""
    return isinstance(document, dict) and document.get("schema") == SCHEMA


def names_image(document: Any, image_uri: str) -> bool:
    """True if stylize's ``document`` describes an image of ``image_uri``'s file name (the folder
    may differ: a catalog copied elsewhere keeps its metadata)."""
    output = document.get("output") if is_stylize_metadata(document) else None
    recorded = output.get("uri") if isinstance(output, dict) else None
    return isinstance(recorded, str) and _file_name(recorded) == _file_name(image_uri)


def _file_name(uri: str) -> str:
    return uri.replace("\\", "/").rstrip("/").rpartition("/")[2]


def job_key(content_sha: str, style_shas: Sequence[str], settings: Settings, engine_version: str) -> str:
    """Hex SHA-256 over a canonical JSON of everything that decides the output.

    Style order matters (blend weights are positional), so it is kept.
    """
    document = {
        "content": content_sha,
        "styles": list(style_shas),
        "settings": settings.model_dump(mode="json"),
        "engine": engine_version,
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return sha256(canonical.encode("utf-8"))


def build_metadata(
    *,
    job: Job,
    key: str,
    inputs: Mapping[str, Any],
    output: Mapping[str, Any],
    device: str,
    versions: Mapping[str, str],
    started: datetime,
    finished: datetime,
    records: Sequence[Any],
) -> dict:
    """The metadata document for one finished job.

    ``inputs`` is ``{"content": {"uri", "sha256", "size"}, "styles": [...]}``, ``output``
    the image's ``output_record``.
    ``records`` are per-iteration objects (``stylize.engine.optimize.Record`` or any
    object or dict with the ``LOSS_COLUMNS``), stored column-wise, which is
    compact and loads straight into a dataframe. Naive datetimes are taken as UTC.
    """
    started, finished = _utc(started), _utc(finished)
    return {
        "schema": SCHEMA,
        "job": job.name,
        "key": key,
        "inputs": _plain(inputs),
        "settings": job.settings.model_dump(mode="json"),
        "output": dict(output),
        "device": device,
        "versions": dict(versions),
        "started": _iso(started),
        "finished": _iso(finished),
        "seconds": round((finished - started).total_seconds(), 3),
        "losses": {column: [_number(_field(r, column)) for r in records] for column in LOSS_COLUMNS},
    }


def encode(meta: Mapping[str, Any]) -> bytes:
    """UTF-8 JSON, indented for people reading a catalog; NaN is refused (not JSON)."""
    return (json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def read_metadata(storage: Storage, uri: str) -> dict | None:
    """The metadata at ``uri``, or None if it is absent or not a JSON object.

    A half-written or corrupt file means "incomplete", so the job reruns.
    Other storage errors (access denied, timeouts) propagate: treating them as
    "incomplete" would redo expensive work that is probably done.
    """
    try:
        data = storage.read(uri)
    except NotFoundError:
        return None
    try:
        meta = json.loads(data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    return meta if isinstance(meta, dict) else None


def is_complete(storage: Storage, job: Job, key: str, meta: dict | None = None) -> bool:
    """True if ``job`` is done with this ``key``: its metadata matches and its image is the one
    it describes (``image_matches``). ``meta``: the job's metadata, when already read.

    The image is looked up at ``job.image_uri`` (not the URI recorded in the
    metadata), so a catalog copied to another place is still recognised.
    """
    meta = read_metadata(storage, job.metadata_uri) if meta is None else meta
    if not is_stylize_metadata(meta) or meta.get("pending") or meta.get("key") != key:
        return False
    output = meta.get("output")
    return isinstance(output, dict) and image_matches(storage, job.image_uri, output)


def image_matches(storage: Storage, uri: str, output: Mapping[str, Any]) -> bool:
    """True if the image at ``uri`` is the one ``output`` (an ``output_record``) describes.

    Never downloads from S3: the ETag of a HEAD must equal the recorded ETag
    or MD5. A local file is read and hashed. Metadata without a checksum
    (written before checksums were recorded) proves nothing: False.
    """
    size = output.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not isinstance(output.get("sha256"), str):
        return False
    info = storage.stat(uri)
    if info is None or info.size != size:
        return False
    if is_s3(uri):
        return info.etag is not None and info.etag in (output.get("etag"), output.get("md5"))
    try:
        return sha256(storage.read(uri)) == output["sha256"]
    except NotFoundError:  # removed since the stat
        return False


def _field(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def _number(value: Any) -> Any:
    # Tensors and numpy scalars become plain numbers; NaN/inf (not JSON) become null.
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
