"""Storage events: which new S3 objects start a catalog run, and under which key.

S3 reports a new object in several envelopes; ``parse_event`` reads them all
into ``ObjectEvent`` records:

- an S3 event notification, ``{"Records": [{"eventSource": "aws:s3", ...}]}``
  (an SQS message body, or a Lambda event);
- the same wrapped by SNS: an SQS body ``{"Type": "Notification", "Message": "..."}``,
  or a Lambda event ``{"Records": [{"EventSource": "aws:sns", "Sns": {...}}]}``;
- an SQS batch handed to Lambda, ``{"Records": [{"eventSource": "aws:sqs", "body": "..."}]}``;
- an EventBridge event, ``{"source": "aws.s3", "detail-type": "Object Created", ...}``.

Keys arrive URL-encoded, with ``+`` for a space; ``ObjectEvent.key`` is the
decoded, real key. ``Routes`` decides what an object starts: a YAML file under
the manifest prefix starts a run of that manifest; an image under the images
prefix joins a batch (``Debouncer``) that starts one run of the standing
manifest, whose grid re-expands over the prefix while finished jobs are
skipped. Every run carries an idempotency key made from the (bucket, key,
ETag) of the objects behind it, so a redelivered notification never starts a
second run: Prefect dedupes flow runs by that key, and ``RunLedger`` does the
same for runs started in-process.

The SQS loop and in-process runs live in ``flows/watch.py``; the AWS Lambda
entry point, which starts runs through the Prefect REST API, in
``stylize/app/aws_lambda.py``. This module imports neither Prefect nor torch,
so a Lambda package needs only the standard library, boto3 (via
``stylize.catalog.storage``) and this package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Generic, Iterable, Iterator, Literal, Mapping, TypeVar
from urllib.parse import unquote_plus

from stylize.errors import ConfigError, StorageError
from stylize.catalog.storage import is_listed_image, is_s3, split_s3

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = (".yaml", ".yml")
# Envelopes that hold JSON text: at most SQS > SNS > S3, two levels; more than this many
# is a malformed or hostile body, not a notification.
_MAX_DEPTH = 4
# Problem messages quote at most this much of a bad value.
_PREVIEW = 80

Kind = Literal["manifest", "image"]
T = TypeVar("T")


# --- parsing ---------------------------------------------------------------


@dataclass(frozen=True)
class ObjectEvent:
    """One new S3 object, as named by a notification."""

    bucket: str
    key: str  # decoded: the object's real key
    etag: str  # without quotes

    @property
    def uri(self) -> str:
        """``s3://bucket/key``."""
        return f"s3://{self.bucket}/{self.key}"

    @property
    def identity(self) -> tuple[str, str, str]:
        """(bucket, key, ETag): the same upload, however often it is reported."""
        return (self.bucket, self.key, self.etag)


@dataclass(frozen=True)
class Parsed:
    """What one message or event says: new objects, what was skipped, and what was malformed."""

    objects: tuple[ObjectEvent, ...] = ()
    skipped: tuple[str, ...] = ()  # well formed but not an object creation (test events, deletions)
    problems: tuple[str, ...] = ()  # malformed parts, each naming where it is


def parse_message(body: str | bytes) -> Parsed:
    """Parse an SQS message body (S3 notification, SNS-wrapped or EventBridge); never raises."""
    try:
        event = json.loads(body)
    except (TypeError, ValueError) as exc:
        return Parsed(problems=(f"message body: expected JSON, found {_preview(body)} ({exc})",))
    return parse_event(event)


def parse_event(event: Any) -> Parsed:
    """Parse a decoded event of any supported shape (see the module docstring); never raises.

    A malformed record is reported in ``problems`` and does not hide the
    well-formed records beside it.
    """
    reader = _Reader()
    reader.event(event, "event", 0)
    return Parsed(tuple(reader.objects), tuple(reader.skipped), tuple(reader.problems))


class _Malformed(Exception):
    """One part of an event is not what its shape promises; the message says where."""


class _Reader:
    def __init__(self):
        self.objects: list[ObjectEvent] = []
        self.skipped: list[str] = []
        self.problems: list[str] = []

    def event(self, event: Any, where: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            self.problems.append(f"{where}: JSON envelopes nested more than {_MAX_DEPTH} deep")
            return
        if not isinstance(event, dict):
            self.problems.append(f"{where}: expected a JSON object, found {_kind(event)}")
            return
        if event.get("Event") == "s3:TestEvent":
            self.skipped.append(f"{where}: S3 test event for bucket {event.get('Bucket')!r}")
        elif "Records" in event:
            self.records(event["Records"], f"{where}.Records", depth)
        elif event.get("Type") == "Notification" and "Message" in event:
            self.nested(event["Message"], f"{where}.Message", depth)
        elif event.get("source") == "aws.s3" and "detail-type" in event:
            self.guarded(self.eventbridge, event, where)
        else:
            keys = ", ".join(sorted(map(str, event))[:8]) or "none"
            self.problems.append(
                f"{where}: expected an S3 notification (Records), an SNS notification (Type, Message) "
                f"or an EventBridge S3 event (source, detail-type), found keys: {keys}"
            )

    def nested(self, text: Any, where: str, depth: int) -> None:
        if not isinstance(text, str):
            self.problems.append(f"{where}: expected a JSON string, found {_kind(text)}")
            return
        try:
            inner = json.loads(text)
        except ValueError as exc:
            self.problems.append(f"{where}: expected JSON, found {_preview(text)} ({exc})")
            return
        self.event(inner, where, depth + 1)

    def records(self, records: Any, where: str, depth: int) -> None:
        if not isinstance(records, list):
            self.problems.append(f"{where}: expected a list of records, found {_kind(records)}")
            return
        for i, record in enumerate(records):
            at = f"{where}[{i}]"
            if not isinstance(record, dict):
                self.problems.append(f"{at}: expected a JSON object, found {_kind(record)}")
                continue
            # S3 and SQS records spell it eventSource; SNS records EventSource.
            source = record.get("eventSource", record.get("EventSource"))
            if source == "aws:s3":
                self.guarded(self.s3_record, record, at)
            elif source == "aws:sqs":
                self.nested(record.get("body"), f"{at}.body", depth)
            elif source == "aws:sns":
                sns = record.get("Sns")
                message = sns.get("Message") if isinstance(sns, dict) else None
                self.nested(message, f"{at}.Sns.Message", depth)
            else:
                self.problems.append(f"{at}.eventSource: expected aws:s3, aws:sqs or aws:sns, found {source!r}")

    def guarded(self, read: Callable[[dict, str], None], record: dict, where: str) -> None:
        try:
            read(record, where)
        except _Malformed as exc:
            self.problems.append(str(exc))

    def s3_record(self, record: dict, where: str) -> None:
        name = _text(record, ("eventName",), where)
        if not name.startswith("ObjectCreated:"):
            self.skipped.append(f"{where}: {name} event, not an object creation")
            return
        key = _text(record, ("s3", "object", "key"), where)
        self.objects.append(ObjectEvent(
            bucket=_text(record, ("s3", "bucket", "name"), where),
            key=unquote_plus(key),
            etag=_text(record, ("s3", "object", "eTag"), where).strip('"'),
        ))

    def eventbridge(self, event: dict, where: str) -> None:
        kind = event["detail-type"]
        if kind != "Object Created":
            self.skipped.append(f"{where}: EventBridge {kind!r} event, not an object creation")
            return
        # Decoded like a notification key, as AWS Lambda Powertools reads these events.
        key = unquote_plus(_text(event, ("detail", "object", "key"), where))
        obj = event["detail"]["object"]  # an object: _text just walked through it
        # AWS spells it "etag" here; emulators (moto) write "eTag" as in notifications.
        etag_field = "eTag" if "etag" not in obj and "eTag" in obj else "etag"
        self.objects.append(ObjectEvent(
            bucket=_text(event, ("detail", "bucket", "name"), where),
            key=key,
            etag=_text(event, ("detail", "object", etag_field), where).strip('"'),
        ))


def _text(obj: Any, path: tuple[str, ...], where: str) -> str:
    """The non-empty string at ``path`` inside ``obj``; _Malformed naming the field otherwise."""
    value = obj
    for i, name in enumerate(path):
        if not isinstance(value, dict):
            holder = ".".join((where, *path[:i]))
            raise _Malformed(f"{holder}: expected a JSON object, found {_kind(value)}")
        if name not in value:
            raise _Malformed(f"{'.'.join((where, *path[:i + 1]))}: missing")
        value = value[name]
    if not isinstance(value, str) or not value:
        raise _Malformed(f"{'.'.join((where, *path))}: expected a non-empty string, found {_preview(value)}")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(value), _preview(value))


def _preview(value: Any) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = repr(text)
    return text if len(text) <= _PREVIEW else text[:_PREVIEW] + "..."


# --- routing and keys --------------------------------------------------------


@dataclass(frozen=True)
class RunRequest:
    """A catalog run to start: which manifest, why, and the key that makes starting it idempotent."""

    manifest: str
    idempotency_key: str
    reason: str
    # "manifest": a new manifest's run of itself; "images": the standing manifest's run for
    # new images (the manifest's problems are then not a verdict on the notifications).
    kind: Literal["manifest", "images"] = "manifest"

    @property
    def parameters(self) -> dict[str, Any]:
        """The ``stylize-catalog`` flow's parameters for this run."""
        return {"manifest": self.manifest}


def idempotency_key(kind: str, target: str, objects: Iterable[ObjectEvent]) -> str:
    """A key naming the run that ``objects`` start on ``target``.

    Made from the sorted set of their (bucket, key, ETag): the same objects in
    any order, or reported twice, give the same key; a re-upload with other
    content has another ETag and so another key.
    """
    identities = sorted({obj.identity for obj in objects})
    if not identities:
        raise ValueError(f"idempotency_key({kind!r}, {target!r}): no objects to make a key from")
    payload = json.dumps([kind, target, identities], separators=(",", ":"))
    return f"stylize-{kind}-{hashlib.sha256(payload.encode()).hexdigest()[:40]}"


@dataclass(frozen=True)
class _Prefix:
    """An S3 folder: a bucket and a key prefix that is empty or ends with ``/``."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str, option: str) -> "_Prefix":
        if not is_s3(uri):
            raise ConfigError(f"{option} {uri!r}: expected s3://bucket/prefix/")
        try:
            bucket, key = split_s3(uri)
        except StorageError as exc:
            raise ConfigError(f"{option}: {exc}") from None
        # Taken as a folder, as Storage.list does: photos means photos/, not photos2/.
        return cls(bucket, key if not key or key.endswith("/") else key + "/")

    def relative(self, obj: ObjectEvent) -> str | None:
        """``obj``'s key below this prefix, or None when it is elsewhere."""
        if obj.bucket != self.bucket or not obj.key.startswith(self.key):
            return None
        return obj.key[len(self.key):]

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


#: How the CLI names each setting in errors; the Lambda handler passes its env var names.
CLI_OPTIONS = {
    "manifest_prefix": "--manifest-prefix",
    "images_prefix": "--images-prefix",
    "standing_manifest": "--standing-manifest",
}


class Routes:
    """Which new objects start which runs.

    A ``.yaml``/``.yml`` file under ``manifest_prefix`` starts a run of
    itself. An image under ``images_prefix`` (an image extension, no dot-file
    part, as a manifest grid lists them) joins a batch that starts one
    incremental run of ``standing_manifest``. Anything else is ignored.
    ``options`` names the settings in errors (``--images-prefix`` or
    ``STYLIZE_IMAGES_PREFIX``).
    """

    def __init__(
        self,
        *,
        manifest_prefix: str | None = None,
        images_prefix: str | None = None,
        standing_manifest: str | None = None,
        options: Mapping[str, str] = CLI_OPTIONS,
    ):
        o = options
        if not manifest_prefix and not images_prefix:
            raise ConfigError(f"nothing to watch: give {o['manifest_prefix']} (new manifests start runs), "
                              f"{o['images_prefix']} (new images start runs of a standing manifest), or both")
        if images_prefix and not standing_manifest:
            raise ConfigError(f"{o['images_prefix']} needs {o['standing_manifest']}: the manifest whose grid "
                              "the new images join")
        if standing_manifest and not images_prefix:
            raise ConfigError(f"{o['standing_manifest']} is only used with {o['images_prefix']}; give both or neither")
        self.manifests = _Prefix.parse(manifest_prefix, o["manifest_prefix"]) if manifest_prefix else None
        self.images = _Prefix.parse(images_prefix, o["images_prefix"]) if images_prefix else None
        self.standing_manifest = standing_manifest

    def __repr__(self) -> str:
        return (f"Routes(manifest_prefix={str(self.manifests) if self.manifests else None!r}, "
                f"images_prefix={str(self.images) if self.images else None!r}, "
                f"standing_manifest={self.standing_manifest!r})")

    def classify(self, obj: ObjectEvent) -> Kind | None:
        """"manifest", "image", or None for an object that starts nothing."""
        if self.manifests is not None:
            rel = self.manifests.relative(obj)
            if rel and rel.lower().endswith(MANIFEST_EXTENSIONS) and not _hidden(rel):
                return "manifest"
        if self.images is not None:
            rel = self.images.relative(obj)
            if rel and is_listed_image(rel):
                return "image"
        return None

    def manifest_run(self, obj: ObjectEvent) -> RunRequest:
        """The run a new manifest starts: that manifest, keyed by its upload."""
        return RunRequest(
            manifest=obj.uri,
            idempotency_key=idempotency_key("manifest", obj.uri, [obj]),
            reason=f"new manifest {obj.uri} (ETag {obj.etag})",
        )

    def images_run(self, objects: Iterable[ObjectEvent]) -> RunRequest:
        """The one incremental run of the standing manifest that a batch of new images starts."""
        objects = list(objects)
        count = len({obj.identity for obj in objects})
        return RunRequest(
            manifest=self.standing_manifest,
            idempotency_key=idempotency_key("images", self.standing_manifest, objects),
            reason=f"{count} new image(s) under {self.images}",
            kind="images",
        )

    def plan(self, objects: Iterable[ObjectEvent]) -> list[RunRequest]:
        """Without debouncing: one run per new manifest, and one run for all the new images."""
        manifests: dict[tuple[str, str, str], ObjectEvent] = {}
        images: list[ObjectEvent] = []
        for obj in objects:
            kind = self.classify(obj)
            if kind == "manifest":
                manifests.setdefault(obj.identity, obj)
            elif kind == "image":
                images.append(obj)
        requests = [self.manifest_run(obj) for obj in manifests.values()]
        if images:
            requests.append(self.images_run(images))
        return requests

    def output_problem(self, output: str) -> str | None:
        """Why a standing manifest writing to ``output`` would trigger itself, or None.

        Outputs under the images prefix would be new images: each run would
        start the next one, on its own outputs.
        """
        if self.images is None or not is_s3(output):
            return None
        bucket, key = split_s3(output)
        folder = key.rstrip("/") + "/" if key else ""
        if bucket == self.images.bucket and folder.startswith(self.images.key):
            return (f"the standing manifest {self.standing_manifest} writes to {output}, under the images "
                    f"prefix {self.images}: its outputs would start new runs on themselves; "
                    "choose an output outside the images prefix")
        return None


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


# --- debouncing ----------------------------------------------------------------


class Debouncer(Generic[T]):
    """Gathers items into one batch that is due once ``window`` seconds pass without a new
    item, or ``max_wait`` seconds after the first, whichever comes first.

    ``max_wait`` (default: ten windows) keeps a steady trickle of uploads from
    postponing the batch forever. ``clock`` returns seconds (``time.monotonic``
    by default); tests pass a fake one.
    """

    def __init__(self, window: float, *, max_wait: float | None = None, clock: Callable[[], float] = time.monotonic):
        if window < 0:
            raise ConfigError(f"debounce window: expected seconds >= 0, found {window}")
        max_wait = 10 * window if max_wait is None else max_wait
        if max_wait < window:
            raise ConfigError(f"max wait: expected at least the debounce window ({window} s), found {max_wait}")
        self.window = window
        self.max_wait = max_wait
        self._clock = clock
        self._items: list[T] = []
        self._first = self._last = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        """Add ``item`` to the batch, restarting the quiet window."""
        now = self._clock()
        if not self._items:
            self._first = now
        self._last = now
        self._items.append(item)

    def time_left(self) -> float | None:
        """Seconds until the batch is due (0 when due), or None when there is no batch."""
        if not self._items:
            return None
        deadline = min(self._last + self.window, self._first + self.max_wait)
        return max(0.0, deadline - self._clock())

    def due(self) -> bool:
        """True when there is a batch and its time has come."""
        return self.time_left() == 0.0

    def take(self) -> list[T]:
        """The batch, in arrival order; the debouncer starts empty again."""
        items, self._items = self._items, []
        return items


# --- the in-process ledger -----------------------------------------------------------


class RunLedger:
    """Idempotency keys of the runs started on this machine, in a SQLite file.

    The in-process stand-in for Prefect's flow-run idempotency keys: a key is
    claimed before its run starts, so a redelivered message finds it and
    starts nothing. Each key records the process that runs it and, once the
    run has gone through its jobs, that it finished. So a redelivered message
    can tell a finished run (delete the message) from one still running in
    another live process (keep the message until it ends), and a run whose
    process died without a word (SIGKILL, power loss) is taken over by the
    next claim. Safe for several processes sharing the file.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot create the state folder: {exc.strerror or exc}") from exc
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS started (key TEXT PRIMARY KEY, manifest TEXT NOT NULL, "
                       "reason TEXT NOT NULL, started TEXT NOT NULL)")
            columns = {row[1] for row in db.execute("PRAGMA table_info(started)")}
            # Ledgers written before these columns: their rows (owner NULL) count as finished runs.
            for column in ("owner", "finished"):
                if column not in columns:
                    db.execute(f"ALTER TABLE started ADD COLUMN {column} TEXT")

    def claim(self, request: RunRequest) -> bool:
        """Record ``request`` as started by this process; False when its key is taken: finished
        (``finished`` says so) or running in a live process. A key whose process is gone is
        taken over."""
        now = datetime.now(timezone.utc).isoformat()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")  # the read and the write below see no other claim between
            row = db.execute("SELECT owner, finished FROM started WHERE key = ?",
                             (request.idempotency_key,)).fetchone()
            if row is None:
                db.execute("INSERT INTO started (key, manifest, reason, started, owner) VALUES (?, ?, ?, ?, ?)",
                           (request.idempotency_key, request.manifest, request.reason, now, _this_process()))
                return True
            owner, finished = row
            if finished is not None or owner is None or _alive(owner):
                return False
            log.warning("run %s was started by %s, which is gone; running it again", request.idempotency_key, owner)
            db.execute("UPDATE started SET owner = ?, started = ? WHERE key = ?",
                       (_this_process(), now, request.idempotency_key))
            return True

    def finished(self, key: str) -> bool:
        """True when the run of ``key`` went through its jobs (its messages may go)."""
        with self._db() as db:
            row = db.execute("SELECT owner, finished FROM started WHERE key = ?", (key,)).fetchone()
        return row is not None and (row[1] is not None or row[0] is None)

    def finish(self, key: str) -> None:
        """Record that the run of ``key`` went through its jobs."""
        with self._db() as db:
            db.execute("UPDATE started SET finished = ? WHERE key = ?", (datetime.now(timezone.utc).isoformat(), key))

    def release(self, key: str) -> None:
        """Forget ``key``: its run did not start after all, so a redelivery may start it."""
        with self._db() as db:
            db.execute("DELETE FROM started WHERE key = ?", (key,))

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30)
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: cannot open the run ledger: {exc}") from exc
        try:
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: run ledger: {exc}") from exc
        finally:
            db.close()


def _process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, from /proc), "dead" for a zombie, or None
    when /proc cannot tell (no such process, or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (name) ": a name may hold spaces
    return "dead" if fields[0] in ("Z", "X") else fields[19]


def _this_process() -> str:
    """``host:pid:start``: names this process, so that a reused pid is not taken for it."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid()) or ''}"


def _alive(owner: str) -> bool:
    """Whether the process named by ``_this_process`` still runs; another host's counts as alive
    (it cannot be checked, and keeping a message is the safe mistake)."""
    host, pid, started = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return not started or _process_start(int(pid)) == started


# --- deployment names --------------------------------------------------------------


def split_deployment_name(name: str, option: str) -> tuple[str, str]:
    """("flow name", "deployment name") from "flow name/deployment name"; ConfigError naming ``option`` otherwise."""
    flow_name, sep, deployment_name = name.partition("/")
    if not sep or not flow_name or not deployment_name or "/" in deployment_name:
        raise ConfigError(f"{option} {name!r}: expected 'flow name/deployment name', e.g. 'stylize-catalog/catalog'")
    return flow_name, deployment_name
