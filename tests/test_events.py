"""Storage events: envelope parsing, key decoding, routing, idempotency keys, debouncing, the ledger."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stylize.errors import ConfigError
from stylize.catalog.events import (
    Debouncer, ObjectEvent, RunLedger, Routes, idempotency_key, parse_event, parse_message,
)


def s3_record(key="photos/cat.jpg", etag="e1", bucket="bkt", name="ObjectCreated:Put"):
    return {"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": name,
            "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 5, "eTag": etag}}}


def notification(*records):
    return {"Records": list(records)}


def eventbridge(key="photos/cat.jpg", etag="e1", kind="Object Created", etag_field="etag"):
    return {"version": "0", "detail-type": kind, "source": "aws.s3",
            "detail": {"bucket": {"name": "bkt"}, "object": {"key": key, "size": 5, etag_field: etag}}}


def sns_body(inner):
    return {"Type": "Notification", "TopicArn": "arn:aws:sns:us-east-1:1:t", "Message": json.dumps(inner)}


CAT = ("bkt", "photos/cat.jpg", "e1")


@pytest.mark.parametrize(
    "event, objects, skipped, problem",
    [
        pytest.param(notification(s3_record()), [CAT], 0, None, id="s3-notification"),
        pytest.param(notification(s3_record(key="photos/my+cat%2B1%3A2.jpg")),
                     [("bkt", "photos/my cat+1:2.jpg", "e1")], 0, None, id="s3-key-url-decoded"),
        pytest.param(notification(s3_record(etag='"e1"')), [CAT], 0, None, id="quoted-etag"),
        pytest.param({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "bkt"}, [], 1, None,
                     id="s3-test-event"),
        pytest.param(notification(s3_record(name="ObjectRemoved:Delete")), [], 1, None, id="deletion-skipped"),
        pytest.param(sns_body(notification(s3_record())), [CAT], 0, None, id="sns-wrapped-sqs-body"),
        pytest.param(notification({"EventSource": "aws:sns",
                                   "Sns": {"Message": json.dumps(notification(s3_record()))}}),
                     [CAT], 0, None, id="sns-lambda-event"),
        pytest.param(notification({"eventSource": "aws:sqs", "body": json.dumps(notification(s3_record()))},
                                  {"eventSource": "aws:sqs", "body": json.dumps(eventbridge(key="b.png", etag="e2"))}),
                     [CAT, ("bkt", "b.png", "e2")], 0, None, id="sqs-lambda-batch"),
        pytest.param(eventbridge(), [CAT], 0, None, id="eventbridge"),
        pytest.param(eventbridge(key="photos/my+cat.jpg", etag_field="eTag"), [("bkt", "photos/my cat.jpg", "e1")],
                     0, None, id="eventbridge-moto-spelling"),
        pytest.param(eventbridge(kind="Object Deleted"), [], 1, None, id="eventbridge-deletion-skipped"),
        pytest.param(notification(s3_record(), {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {}}),
                     [CAT], 0, "event.Records[1].s3.object: missing", id="good-record-beside-bad"),
        pytest.param(["a", "list"], [], 0, "event: expected a JSON object, found a list", id="not-an-object"),
        pytest.param({"hello": 1}, [], 0, "found keys: hello", id="unknown-shape"),
        pytest.param({"Records": "x"}, [], 0, "event.Records: expected a list", id="records-not-list"),
        pytest.param(notification({"eventSource": "aws:kinesis"}), [], 0, "expected aws:s3, aws:sqs or aws:sns",
                     id="unknown-source"),
        pytest.param(notification(s3_record(etag="")), [], 0, "s3.object.eTag: expected a non-empty string",
                     id="empty-etag"),
        pytest.param({"Type": "Notification", "Message": "{oops"}, [], 0, "event.Message: expected JSON",
                     id="sns-message-not-json"),
        pytest.param(notification({"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {"bucket": 3}}),
                     [], 0, "s3.object: missing", id="record-without-object"),
    ],
)
def test_parse_event_shapes(event, objects, skipped, problem):
    parsed = parse_event(event)
    assert [o.identity for o in parsed.objects] == objects
    assert len(parsed.skipped) == skipped
    if problem is None:
        assert parsed.problems == ()
    else:
        assert len(parsed.problems) == 1 and problem in parsed.problems[0], parsed.problems


def test_parse_message_never_raises_on_garbage():
    assert "expected JSON" in parse_message(b"\xff\xfe not json").problems[0]
    assert "expected JSON" in parse_message("").problems[0]
    nested = json.dumps(notification(s3_record()))
    for _ in range(6):  # deeper than any real SQS > SNS > S3 nesting
        nested = json.dumps(sns_body(json.loads(nested)))
    assert "nested more than" in parse_message(nested).problems[0]
    assert parse_message(json.dumps(notification(s3_record()))).objects[0].uri == "s3://bkt/photos/cat.jpg"


# --- routing -------------------------------------------------------------------


@pytest.fixture
def routes():
    return Routes(manifest_prefix="s3://bkt/manifests/", images_prefix="s3://bkt/photos",
                  standing_manifest="s3://bkt/manifests/catalog.yaml")


@pytest.mark.parametrize(
    "bucket, key, kind",
    [
        ("bkt", "manifests/a.yaml", "manifest"),
        ("bkt", "manifests/sub/a.YML", "manifest"),
        ("bkt", "manifests/.draft.yaml", None),
        ("bkt", "manifests/a.json", None),
        ("bkt", "manifests/x.jpg", None),
        ("bkt", "photos/x.jpg", "image"),
        ("bkt", "photos/2026/x.PNG", "image"),
        ("bkt", "photos/._x.jpg", None),
        ("bkt", "photos/.thumbnails/x.jpg", None),
        ("bkt", "photos/notes.txt", None),
        ("bkt", "photos2/x.jpg", None),
        ("other", "photos/x.jpg", None),
    ],
)
def test_classify(routes, bucket, key, kind):
    assert routes.classify(ObjectEvent(bucket, key, "e")) == kind


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "nothing to watch"),
        ({"images_prefix": "s3://b/p/"}, "--images-prefix needs --standing-manifest"),
        ({"manifest_prefix": "s3://b/m/", "standing_manifest": "s3://b/m/c.yaml"}, "only used with --images-prefix"),
        ({"manifest_prefix": "/local/folder"}, "--manifest-prefix '/local/folder': expected s3://bucket/prefix/"),
        ({"manifest_prefix": "s3:///m/"}, "no bucket name"),
    ],
)
def test_routes_refuse_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Routes(**kwargs)


def test_output_under_the_images_prefix_is_refused(routes):
    assert "would start new runs on themselves" in routes.output_problem("s3://bkt/photos/out")
    assert routes.output_problem("s3://bkt/photos") is not None
    assert routes.output_problem("s3://bkt/out") is None
    assert routes.output_problem("s3://bkt/photos2") is None
    assert routes.output_problem("/local/out") is None


# --- idempotency keys and plans ---------------------------------------------------------


def test_idempotency_keys_are_stable_under_reordering_and_repeats():
    a, b, c = (ObjectEvent("bkt", f"photos/{n}.jpg", f"e{n}") for n in range(3))
    key = idempotency_key("images", "s3://bkt/c.yaml", [a, b, c])
    assert idempotency_key("images", "s3://bkt/c.yaml", [c, a, b, a]) == key
    assert key.startswith("stylize-images-") and len(key) < 64
    assert idempotency_key("images", "s3://bkt/c.yaml", [a, b]) != key
    assert idempotency_key("images", "s3://bkt/c.yaml", [a, b, ObjectEvent("bkt", "photos/2.jpg", "new")]) != key
    assert idempotency_key("images", "s3://bkt/other.yaml", [a, b, c]) != key
    assert idempotency_key("manifest", "s3://bkt/c.yaml", [a, b, c]) != key
    with pytest.raises(ValueError, match="no objects"):
        idempotency_key("images", "s3://bkt/c.yaml", [])


def test_plan_starts_one_run_per_manifest_and_one_for_all_images(routes):
    m1, m2 = ObjectEvent("bkt", "manifests/a.yaml", "e1"), ObjectEvent("bkt", "manifests/b.yaml", "e2")
    images = [ObjectEvent("bkt", f"photos/{n}.jpg", f"e{n}") for n in range(3)]
    ignored = ObjectEvent("bkt", "elsewhere/x.jpg", "e")
    requests = routes.plan([m1, images[0], m2, ignored, m1, *images[1:]])
    assert [r.manifest for r in requests] == ["s3://bkt/manifests/a.yaml", "s3://bkt/manifests/b.yaml",
                                              "s3://bkt/manifests/catalog.yaml"]
    assert requests[0].idempotency_key == routes.manifest_run(m1).idempotency_key
    assert requests[2].idempotency_key == routes.images_run(reversed(images)).idempotency_key
    assert requests[2].reason == "3 new image(s) under s3://bkt/photos/"
    assert requests[2].parameters == {"manifest": "s3://bkt/manifests/catalog.yaml"}
    assert routes.plan([ignored]) == []


# --- debouncing -----------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_debouncer_waits_for_a_quiet_window():
    clock = FakeClock()
    batch = Debouncer(1.0, clock=clock)
    assert batch.time_left() is None and not batch.due()
    batch.add("a")
    clock.now += 0.9
    assert not batch.due()
    batch.add("b")  # restarts the window
    assert batch.time_left() == pytest.approx(1.0)
    clock.now += 0.9
    assert not batch.due()
    clock.now += 0.1
    assert batch.due() and len(batch) == 2
    assert batch.take() == ["a", "b"]
    assert len(batch) == 0 and not batch.due() and batch.time_left() is None


def test_debouncer_max_wait_bounds_a_steady_trickle():
    clock = FakeClock()
    batch = Debouncer(1.0, max_wait=3.0, clock=clock)
    for i in range(6):  # a new item every half window: never quiet
        assert not batch.due(), i
        batch.add(i)
        clock.now += 0.5
    assert batch.due() and batch.take() == list(range(6))
    assert Debouncer(2.0).max_wait == 20.0  # default: ten windows


@pytest.mark.parametrize("window, max_wait, message", [(-1, None, "expected seconds >= 0"),
                                                       (5, 1, "at least the debounce window")])
def test_debouncer_refuses_bad_windows(window, max_wait, message):
    with pytest.raises(ConfigError, match=message):
        Debouncer(window, max_wait=max_wait)


# --- the ledger -----------------------------------------------------------------------


def test_ledger_claims_each_key_once_across_instances(tmp_path, routes):
    request = routes.manifest_run(ObjectEvent("bkt", "manifests/a.yaml", "e1"))
    path = tmp_path / "state" / "started.sqlite3"
    first, second = RunLedger(str(path)), RunLedger(str(path))
    assert first.claim(request)
    assert not second.claim(request)
    second.release(request.idempotency_key)
    assert first.claim(request)


def test_ledger_tells_a_finished_run_from_a_running_one_and_takes_over_a_dead_ones(tmp_path, routes):
    request = routes.manifest_run(ObjectEvent("bkt", "manifests/a.yaml", "e1"))
    path = tmp_path / "started.sqlite3"
    # Another watcher process claims the key and is still running it.
    code = (f"import sys; from stylize.catalog.events import RunLedger, RunRequest; "
            f"print(RunLedger({str(path)!r}).claim(RunRequest(*{[request.manifest, request.idempotency_key, 'x']!r})), "
            "flush=True); sys.stdin.read()")
    owner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "True"
        ledger = RunLedger(str(path))
        assert not ledger.claim(request) and not ledger.finished(request.idempotency_key)  # keep the message
    finally:
        owner.kill()  # as kill -9 would: the run never finishes
        owner.wait()
    assert ledger.claim(request)  # its process is gone: the next delivery runs it
    assert not ledger.claim(request)  # ours now, and this process is alive
    ledger.finish(request.idempotency_key)
    assert ledger.finished(request.idempotency_key) and not RunLedger(str(path)).claim(request)


def test_ledger_written_before_owners_were_recorded_counts_its_keys_as_finished(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE started (key TEXT PRIMARY KEY, manifest TEXT NOT NULL, reason TEXT NOT NULL, "
                   "started TEXT NOT NULL)")
        db.execute("INSERT INTO started VALUES ('k', 's3://b/m.yaml', 'old', '2026-01-01T00:00:00')")
    assert RunLedger(str(path)).finished("k")


@pytest.mark.parametrize("module", ["stylize.catalog.events", "stylize.app.aws_lambda"])
def test_events_and_lambda_modules_import_neither_prefect_nor_torch(module):
    code = f"import sys, {module}; print(sorted({{'prefect', 'torch'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
