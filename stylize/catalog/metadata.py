"""The JSON written next to every output image, and the key that decides reruns.

A job is complete when ``<name>.json`` exists with this schema, its key equals
the key the job would have now, and the image it describes exists with the
recorded size. The key hashes the input images' bytes, the resolved settings
and the engine version, so changing any of them reruns the job while renaming
or moving an input does not.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Mapping, Sequence

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
    output_uri: str,
    output_size: int,
    device: str,
    versions: Mapping[str, str],
    started: datetime,
    finished: datetime,
    records: Sequence[Any],
) -> dict:
    """The metadata document for one finished job.

    ``inputs`` is ``{"content": {"uri", "sha256", "size"}, "styles": [...]}``.
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
        "output": {"uri": output_uri, "size": int(output_size)},
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


def is_complete(storage: Storage, job: Job, key: str) -> bool:
    """True if ``job`` is done with this ``key``: its metadata matches and its image is intact.

    The image is looked up at ``job.image_uri`` (not the URI recorded in the
    metadata), so a catalog copied to another place is still recognised.
    """
    meta = read_metadata(storage, job.metadata_uri)
    if meta is None or meta.get("schema") != SCHEMA or meta.get("key") != key:
        return False
    output = meta.get("output")
    size = output.get("size") if isinstance(output, dict) else None
    if not isinstance(size, int) or isinstance(size, bool):
        return False
    info = storage.stat(job.image_uri)
    return info is not None and info.size == size


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
