"""The storage-event watcher: S3 notifications from an SQS queue start catalog runs.

``Watcher`` long-polls the queue. Each message is parsed and routed by
``stylize.catalog.events``: a new manifest starts a run at once; new images are held
in a ``Debouncer`` and start one incremental run of the standing manifest
when the uploads pause. Runs start through a deployment (``DeploymentRuns``:
``run_deployment`` with an idempotency key, not waiting) or here
(``InProcessRuns``: the ``stylize_catalog`` flow, with a local ``RunLedger``
of keys), so a redelivered message never starts a second run.

Delivery rules: a message is deleted only once a run covering it has been
accepted by the deployment, or (in-process) has gone through every job of
its manifest (for images: their batch's run); a malformed message or an S3
test event is logged and deleted. A message is kept, and SQS delivers it
again, when its run cannot start (the Prefect API is down, the deployment is
gone) or stops short: interrupted, a storage outage, or a standing manifest
that cannot be read, is invalid or writes under the images prefix (checked
before every image run, not only at start-up, since it can be edited while
the watcher runs). A new manifest that is itself invalid is a verdict on
that upload: its message is deleted, and a corrected upload starts a run.
Kept messages come back after ``retry_after`` seconds; for image runs the
wait doubles with each failure in a row, up to ``MAX_BACKOFF``, and each
distinct problem is logged once, so a broken standing manifest costs a
manifest read every few minutes, not a loop (a redrive policy can move
messages that keep failing to a dead-letter queue).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Protocol

import boto3
from botocore import exceptions as bex

from stylize.errors import ConfigError, StylizeError, TransientStorageError
from stylize.catalog.events import (
    Debouncer, ObjectEvent, Routes, RunLedger, RunRequest, parse_message, split_deployment_name,
)
from stylize.catalog.manifest import load_manifest

log = logging.getLogger("stylize.watch")

#: SQS limits: messages per receive or batch call, long-poll seconds, visibility seconds.
SQS_BATCH, SQS_MAX_WAIT, SQS_MAX_VISIBILITY = 10, 20, 12 * 3600
#: Extra seconds held image messages stay invisible beyond the debounce's max wait.
HOLD_MARGIN = 60
#: The longest wait before image messages whose run failed come back (seconds).
MAX_BACKOFF = 900


class RunNotFinished(StylizeError):
    """An in-process run stopped before going through its jobs; its messages stay in the queue."""


class Runs(Protocol):
    """Starts the run of a ``RunRequest``; returns a line for the log, raises when it could not."""

    def start(self, request: RunRequest) -> str: ...


class DeploymentRuns:
    """Starts runs as flow runs of a deployment, through the Prefect API, without waiting.

    Prefect returns the existing flow run for an idempotency key it has seen,
    so a redelivered message finds its run instead of making another.
    """

    def __init__(self, name: str):
        self.name = name

    def check(self) -> None:
        """Fail now, not at the first upload, when the deployment does not exist."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound
        from prefect.settings import PREFECT_API_URL

        split_deployment_name(self.name, "--deployment")
        if not PREFECT_API_URL.value():  # else Prefect would start a temporary server, with no deployments
            raise ConfigError(f"--deployment {self.name!r}: deployments live on a Prefect server, and "
                              "PREFECT_API_URL is not set; point it at the server (e.g. "
                              "http://127.0.0.1:4200/api), or leave out --deployment to run in this process")
        try:
            with get_client(sync_client=True) as client:
                client.read_deployment_by_name(self.name)
        except ObjectNotFound:
            raise ConfigError(f"--deployment {self.name!r}: no such deployment in the Prefect API; "
                              "`prefect deployment ls` lists them") from None

    def start(self, request: RunRequest) -> str:
        """Create the flow run (or find the one with the same key); returns its name and id."""
        from prefect.deployments import run_deployment

        flow_run = run_deployment(
            self.name, parameters=request.parameters, timeout=0,
            idempotency_key=request.idempotency_key, tags=["stylize-watch"], as_subflow=False,
        )
        return f"flow run {flow_run.name!r} ({flow_run.id}) of {self.name}"


class InProcessRuns:
    """Runs the ``stylize-catalog`` flow in this process, one run at a time.

    The watcher waits while a run goes on. That is deliberate: the flow
    already takes every device of this machine (a second run in a thread
    would only share them), and while it waits new notifications stay in
    SQS, which keeps them durably, rather than in memory. The ledger claims
    a key before its run starts and marks it finished once the run has gone
    through its jobs. A redelivered message whose run finished starts nothing
    (and is deleted); one whose run goes on in another live watcher is kept
    until that run ends. A run that stops short (an exception, Ctrl+C,
    SIGTERM) frees its key, and one whose watcher was killed outright
    (SIGKILL) is taken over by the next claim, so the message, which was not
    deleted, starts it again when SQS delivers it again.
    """

    def __init__(self, ledger: RunLedger):
        self.ledger = ledger
        self._running: str | None = None  # the key of the run in progress

    def start(self, request: RunRequest) -> str:
        """Run the flow to its end, unless the request's key was started before. Returns a line
        for the log once the run covered the request; raises (and frees the key) when it did not."""
        from flows.catalog import stylize_catalog

        key = request.idempotency_key
        if not self.ledger.claim(request):
            if self.ledger.finished(key):
                return f"nothing: the run of key {key} finished before (ledger {self.ledger.path})"
            raise RunNotFinished(f"key {key} is being run by another live process (ledger {self.ledger.path}); "
                                 "its message stays until that run ends")
        self._running = key
        try:
            state = stylize_catalog(manifest=request.manifest, return_state=True)
        except BaseException:
            # The flow did not run to its end (the API refused it, or the watcher is stopping).
            self.release_unfinished()
            raise
        result = state.result(raise_on_failure=False)
        summary = getattr(result, "summary", result)  # CatalogFailed carries the summary
        run = f"flow run {state.state_details.flow_run_id}"
        if isinstance(summary, dict):  # every job ran: done, skipped or failed on its own
            self._finished()
            c = summary["counts"]
            return (f"flow run {summary['flow_run_id']}: {c['done']} done, {c['skipped']} skipped, "
                    f"{c['failed']} failed (summary {summary['summary_uri']})")
        if request.kind == "manifest" and _verdict_on_upload(result):
            self._finished()
            return f"{run} ended {state.type.value}: {result} (not retried: fix and upload the manifest again)"
        self.release_unfinished()
        raise RunNotFinished(f"{run} ended {state.type.value} before its jobs ran: {result}")

    def _finished(self) -> None:
        key, self._running = self._running, None
        self.ledger.finish(key)

    def release_unfinished(self) -> None:
        """Free the key of the run in progress, if any, so a redelivery starts it again."""
        key, self._running = self._running, None
        if key is not None:
            self.ledger.release(key)


def _verdict_on_upload(result: object) -> bool:
    """True when a new manifest's run failed on the manifest itself (invalid, unreadable):
    running it again would fail the same way; a storage outage might pass."""
    return isinstance(result, StylizeError) and not isinstance(result, TransientStorageError)


def check_standing_manifest(routes: Routes) -> None:
    """Raise when the standing manifest is invalid or unreadable (ManifestError, StorageError)
    or writes under the images prefix (ConfigError). At start-up, and before each image run."""
    if routes.standing_manifest is None:
        return
    doc = load_manifest(routes.standing_manifest)
    problem = routes.output_problem(doc.output)
    if problem:
        raise ConfigError(problem)


class Watcher:
    """Consumes S3 notifications from the SQS queue at ``queue_url`` and starts runs.

    ``debounce`` and ``max_wait`` shape the image batches (see
    ``stylize.catalog.events.Debouncer``); ``wait_seconds`` is the SQS long-poll time;
    ``retry_after`` is how long a message whose run could not start stays
    hidden before SQS delivers it again. ``sqs`` is a boto3 SQS client
    (default: from the environment, in the queue's region); ``clock`` drives
    the debouncer.
    """

    def __init__(
        self,
        queue_url: str,
        routes: Routes,
        runs: Runs,
        *,
        debounce: float = 60.0,
        max_wait: float | None = None,
        wait_seconds: int = SQS_MAX_WAIT,
        retry_after: int = 30,
        sqs: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not 0 <= wait_seconds <= SQS_MAX_WAIT:
            raise ConfigError(f"--wait-seconds: expected 0 to {SQS_MAX_WAIT} (the SQS limit), found {wait_seconds}")
        if not 0 <= retry_after <= SQS_MAX_VISIBILITY:
            raise ConfigError(f"--retry-after: expected 0 to {SQS_MAX_VISIBILITY} seconds, found {retry_after}")
        self.queue_url = queue_url
        self.routes = routes
        self.runs = runs
        self.batch: Debouncer[ObjectEvent] = Debouncer(debounce, max_wait=max_wait, clock=clock)
        self.wait_seconds = wait_seconds
        self.retry_after = retry_after
        self.sqs = sqs or _sqs_client(queue_url)
        # Messages whose images wait in the batch: message id -> latest receipt handle.
        self.held: dict[str, str] = {}
        self.hold_seconds = min(SQS_MAX_VISIBILITY, math.ceil(self.batch.max_wait) + HOLD_MARGIN)
        self.failed_batches = 0  # image runs that failed in a row: the backoff's exponent
        self._last_problem: str | None = None  # logged once, not at every retry

    def run(self, *, max_polls: int | None = None, until_idle: bool = False) -> None:
        """Poll until stopped (Ctrl-C), ``max_polls`` polls, or, with ``until_idle``, a poll
        that received nothing while no batch waits. Held messages left at the end are not
        deleted: SQS delivers them again."""
        log.info("watching %s: %s, %s", self.queue_url, self.routes, type(self.runs).__name__)
        polls = 0
        while max_polls is None or polls < max_polls:
            received = self.poll_once()
            polls += 1
            if until_idle and not received and not len(self.batch):
                break
        if self.held:
            log.info("stopping with %d message(s) of an unstarted image batch; SQS will deliver them again",
                     len(self.held))

    def poll_once(self) -> int:
        """Start the image batch if it is due, then receive and handle up to 10 messages;
        returns how many were received."""
        if self.batch.due():
            self._start_batch()
        wait = self.wait_seconds
        left = self.batch.time_left()
        if left is not None:  # do not sleep past the batch's due time
            wait = min(wait, math.ceil(left))
        try:
            reply = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=SQS_BATCH, WaitTimeSeconds=wait,
            )
        except (bex.BotoCoreError, bex.ClientError) as exc:
            log.warning("cannot receive from %s: %s; trying again", self.queue_url, exc)
            time.sleep(min(5, max(wait, 1)))  # botocore already retried; do not spin
            reply = {}
        messages = reply.get("Messages", [])
        for message in messages:
            self._handle(message)
        return len(messages)

    def _handle(self, message: dict) -> None:
        message_id = message["MessageId"]
        if message_id in self.held:  # delivered again while its batch waits: keep the newest handle
            self.held[message_id] = message["ReceiptHandle"]
            return
        parsed = parse_message(message.get("Body", ""))
        for problem in parsed.problems:
            log.warning("message %s: %s", message_id, problem)
        for note in parsed.skipped:
            log.info("message %s: skipped %s", message_id, note)
        manifests, images = [], []
        for obj in parsed.objects:
            kind = self.routes.classify(obj)
            if kind == "manifest":
                manifests.append(obj)
            elif kind == "image":
                images.append(obj)
            else:
                log.debug("message %s: %s is neither a watched manifest nor a watched image", message_id, obj.uri)
        if not manifests and not images:
            self._delete([message], "nothing to start")
            return
        for obj in manifests:
            if not self._start(self.routes.manifest_run(obj)):
                self._release({message_id: message["ReceiptHandle"]})
                return
        if not images:
            self._delete([message], "its run was accepted")
            return
        for obj in images:
            self.batch.add(obj)
        self.held[message_id] = message["ReceiptHandle"]
        # Hidden until the batch is due, plus a margin, so SQS does not hand it out meanwhile.
        self._change_visibility({message_id: message["ReceiptHandle"]}, self.hold_seconds)

    def _start_batch(self) -> None:
        request = self.routes.images_run(self.batch.take())
        held, self.held = self.held, {}
        problem = self._standing_problem()
        if problem is None and self._start(request):
            self.failed_batches, self._last_problem = 0, None
            self._delete([{"MessageId": i, "ReceiptHandle": r} for i, r in held.items()],
                         "their batch's run covered them")
            return
        self.failed_batches += 1
        delay = self.backoff()
        if problem is not None:
            # Once per problem: a standing manifest broken for a day must not fill the log.
            say = log.warning if problem != self._last_problem else log.debug
            say("not starting the run for %s: %s; keeping its %d message(s), next try in %d s (doubling "
                "while it fails, up to %d s)", request.reason, problem, len(held), delay, MAX_BACKOFF)
            self._last_problem = problem
        self._change_visibility(held, delay)

    def backoff(self) -> int:
        """Seconds before kept image messages come back: ``retry_after`` (at least 1) doubled for
        each image run that failed in a row, at most ``MAX_BACKOFF``."""
        base = max(1, self.retry_after)
        return min(MAX_BACKOFF, base * 2 ** min(self.failed_batches - 1, 20))

    def _standing_problem(self) -> str | None:
        """Why the standing manifest must not run now (read afresh: it may have been edited), or None."""
        try:
            check_standing_manifest(self.routes)
        except StylizeError as exc:
            return str(exc)
        return None

    def _start(self, request: RunRequest) -> bool:
        log.info("starting a run for %s (key %s)", request.reason, request.idempotency_key)
        try:
            outcome = self.runs.start(request)
        except Exception as exc:
            # Whatever stopped it (the Prefect API down, the deployment gone, the manifest
            # unreadable, a storage outage), the watcher goes on; the message comes back later.
            log.warning("the run for %s did not go through (%s: %s); keeping its message(s) for SQS to "
                        "deliver again", request.reason, type(exc).__name__, exc)
            log.debug("the run for %s failed to start", request.reason, exc_info=True)
            return False
        log.info("run for %s: %s", request.reason, outcome)
        return True

    def _delete(self, messages: list[dict], why: str) -> None:
        for chunk in _chunks(messages):
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(chunk)]
            try:
                reply = self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
            except (bex.BotoCoreError, bex.ClientError) as exc:
                log.warning("cannot delete %d message(s) from %s (%s); they will be delivered again and "
                            "their idempotency keys will start nothing", len(chunk), self.queue_url, exc)
                continue
            for failed in reply.get("Failed", []):
                log.warning("cannot delete message %s: %s", chunk[int(failed["Id"])]["MessageId"],
                            failed.get("Message") or failed.get("Code"))
            log.debug("deleted %d message(s): %s", len(chunk) - len(reply.get("Failed", [])), why)

    def _release(self, held: dict[str, str]) -> None:
        self._change_visibility(held, self.retry_after)

    def _change_visibility(self, held: dict[str, str], seconds: int) -> None:
        items = list(held.items())
        for chunk in _chunks(items):
            entries = [{"Id": str(i), "ReceiptHandle": receipt, "VisibilityTimeout": seconds}
                       for i, (_, receipt) in enumerate(chunk)]
            try:
                reply = self.sqs.change_message_visibility_batch(QueueUrl=self.queue_url, Entries=entries)
            except (bex.BotoCoreError, bex.ClientError) as exc:
                log.warning("cannot change the visibility of %d message(s) in %s: %s", len(chunk),
                            self.queue_url, exc)
                continue
            for failed in reply.get("Failed", []):
                log.warning("cannot change the visibility of message %s: %s", chunk[int(failed["Id"])][0],
                            failed.get("Message") or failed.get("Code"))


def _chunks(items: list) -> list[list]:
    return [items[i:i + SQS_BATCH] for i in range(0, len(items), SQS_BATCH)]


def _sqs_client(queue_url: str):
    try:
        return boto3.session.Session().client("sqs", region_name=_queue_region(queue_url))
    except bex.NoRegionError:
        raise ConfigError(f"--queue-url {queue_url}: cannot tell the queue's region; set AWS_DEFAULT_REGION") from None


def _queue_region(queue_url: str) -> str | None:
    """The region in an AWS queue URL (https://sqs.REGION.amazonaws.com/...), else None (boto3's default)."""
    host = queue_url.split("://", 1)[-1].split("/", 1)[0]
    parts = host.split(".")
    if len(parts) >= 4 and parts[0] == "sqs" and parts[2] == "amazonaws":
        return parts[1]
    return None
