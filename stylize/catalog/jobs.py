"""Running one job end to end: read inputs, skip if done, stylize, write image then metadata.

``JobRunner`` belongs to one device. It loads VGG19 once (through its
``Engine``) and keeps decoded style images and their Gram targets for the
styles it has seen, so a catalog of many photos over a few styles computes
each style's targets once per size and device.

Errors: a ``TransientStorageError`` is raised so the caller can retry, and
``Cancelled`` so an interrupted run can stop; every other ``StylizeError``
(bad input, bad setting, diverged loss, storage that says no, a job that does
not fit the device even at a smaller size) is a verdict on this job, which
``run`` returns as a failed ``Outcome`` naming the job and the problem.

Crash safety: a pending metadata document (naming the image, no key) replaces
any stale one, then the image is written, then the full metadata, each
atomically; so whenever a process dies, a metadata file describes the image
beside it or is pending (incomplete: the job runs again), and the image is
still known to be stylize's (``outputs.claim``). Two runs writing one job at
once: each checks after its metadata that the image is still the one it
describes, and writes both again if not, so the last metadata matches.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from PIL import Image

from stylize import __version__
from stylize.engine import images
from stylize.catalog import metadata
from stylize.errors import (Cancelled, ConfigError, InputError, ResourceError, StorageError, StylizeError,
                     TransientStorageError)
from stylize.catalog.manifest import Job
from stylize.catalog.outputs import claim, init_uri, snapshot_uri
from stylize.engine.optimize import Engine, Record, RecordCallback, StyleTargets
from stylize.catalog.storage import Storage, check_below
from stylize.catalog.thumbnails import write_thumbnails

log = logging.getLogger(__name__)

Status = Literal["done", "skipped", "failed"]

#: A job that runs out of device memory is retried once with its size times
#: this: 0.7 of the side is about half the pixels, and memory grows with pixels.
OOM_RETRY_SCALE = 0.7


@dataclass
class Outcome:
    """What happened to one job."""

    job: str
    status: Status
    seconds: float = 0.0  # wall time of the whole job, I/O included
    # Its share of the device: its batch's time inside the optimization over the images in the batch,
    # so that a run's jobs add up to the devices' busy time (``runs.device_utilization``).
    engine_seconds: float = 0.0
    output: str | None = None
    error: str | None = None
    final: dict[str, float] = field(default_factory=dict)  # last record's losses
    iterations: int = 0
    kind: str | None = None  # a failure's error class, e.g. "InputError", to group failures by

    def as_row(self) -> dict[str, Any]:
        """A flat dict for tables and JSON summaries."""
        return {
            "job": self.job,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "engine_seconds": round(self.engine_seconds, 3),
            "iterations": self.iterations,
            **{k: float(f"{v:.6g}") for k, v in self.final.items()},
            "output": self.output,
            "error": self.error,
            **({"kind": self.kind} if self.kind else {}),
        }


@dataclass
class Inputs:
    """Input bytes with their checksums, as the job key and the metadata need them."""

    content: bytes
    styles: list[bytes]
    init: bytes | None
    info: dict[str, Any]  # {"content": {uri, sha256, size}, "styles": [...], "init"?: {...}}

    @property
    def shas(self) -> tuple[str, list[str]]:
        """(content sha256, [style sha256, ...]), plus the init image's when it has one."""
        styles = [s["sha256"] for s in self.info["styles"]]
        if "init" in self.info:
            styles = styles + [self.info["init"]["sha256"]]
        return self.info["content"]["sha256"], styles


def read_inputs(job: Job, storage: Storage) -> Inputs:
    """Read a job's content, style and init bytes and checksum them.

    A job the manifest refused (``job.problem``: its settings are invalid) has
    nothing to read: ConfigError with the problem.
    """
    if job.problem is not None:
        raise ConfigError(job.problem)

    def describe(uri: str, data: bytes) -> dict[str, Any]:
        return {"uri": uri, "sha256": metadata.sha256(data), "size": len(data)}

    with about(job, "content"):
        content = storage.read(job.content)
    styles = []
    for i, uri in enumerate(job.styles):
        with about(job, f"style[{i}]" if len(job.styles) > 1 else "style"):
            styles.append(storage.read(uri))
    info: dict[str, Any] = {
        "content": describe(job.content, content),
        "styles": [describe(u, d) for u, d in zip(job.styles, styles)],
    }
    init = None
    if (uri := init_uri(job)) is not None:
        with about(job, "settings.init"):
            init = storage.read(uri)
        info["init"] = describe(uri, init)
    return Inputs(content, styles, init, info)


@contextlib.contextmanager
def about(job: Job, field: str) -> Iterator[None]:
    """Prefix input and storage errors with the job's field path (``pairs[2].content: ...``)."""
    try:
        yield
    except TransientStorageError:
        raise
    except (InputError, StorageError) as exc:
        where = f"{job.source}.{field}" if job.source else field
        raise type(exc)(f"{where}: {exc}") from exc


def key_for(job: Job, inputs: Inputs) -> str:
    """The job key: input checksums, resolved settings, engine version."""
    content_sha, style_shas = inputs.shas
    return metadata.job_key(content_sha, style_shas, job.settings, __version__)


def versions(weights: str) -> dict[str, str]:
    """Versions recorded in every metadata file."""
    import torchvision

    return {"stylize": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "weights": weights}


class JobRunner:
    """Runs jobs on one device with the model and style targets cached."""

    def __init__(self, device: str | torch.device = "auto", *, style_cache: int = 16):
        self.engine = Engine(device)
        self._targets: OrderedDict[tuple, StyleTargets] = OrderedDict()
        self._style_cache = style_cache
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        return str(self.engine.device)

    def _style_targets(self, job: Job, inputs: Inputs) -> StyleTargets:
        s = job.settings
        # Everything the Gram targets depend on, and nothing else.
        key = (tuple(d["sha256"] for d in inputs.info["styles"]), s.style_layers, s.style_scale,
               s.blend(len(job.styles)), s.weights, s.pooling, s.precision)
        with self._lock:
            if key in self._targets:
                self._targets.move_to_end(key)
                return self._targets[key]
        decoded = []
        for i, (uri, data) in enumerate(zip(job.styles, inputs.styles)):
            with about(job, f"style[{i}]" if len(job.styles) > 1 else "style"):
                decoded.append(images.decode(data, name=uri))
        targets = self.engine.style_targets(decoded, s)
        with self._lock:
            self._targets[key] = targets
            while len(self._targets) > self._style_cache:
                self._targets.popitem(last=False)
        return targets

    def run(
        self,
        job: Job,
        storage: Storage,
        *,
        callback: RecordCallback | None = None,
        skip_complete: bool = True,
        image_uri: str | None = None,
        metadata_uri: str | None = None,
        thumbnails: bool = True,
        overwrite: bool | None = None,
    ) -> Outcome:
        """Prepare, compute and finish ``job`` here; returns its ``Outcome``.

        ``thumbnails=False`` writes no ``_thumbs/`` (a lone image has no report);
        ``overwrite`` as in ``outputs.claim``.
        Raises only ``TransientStorageError``; every other problem is a failed outcome.
        """
        prepared = prepare(job, storage, skip_complete=skip_complete, image_uri=image_uri,
                           metadata_uri=metadata_uri, overwrite=overwrite)
        if isinstance(prepared, Outcome):
            return prepared
        return guarded(job, prepared.started, lambda: finish(
            prepared, self.compute(prepared, callback, storage), storage, thumbnails=thumbnails))

    def compute(self, prepared: "Prepared", callback: RecordCallback | None = None,
                storage: Storage | None = None, *, cancel: threading.Event | None = None):
        """The device part of one job: style targets (cached) and the optimization.

        ``storage`` is needed only when the settings ask for intermediate saves;
        setting ``cancel`` stops the job with ``Cancelled``.
        """
        hook = None if callback is None else (lambda _prepared, record: callback(record))
        return self.compute_batch([prepared], hook, storage, cancel=cancel)[0]

    def compute_batch(self, batch: Sequence["Prepared"],
                      callback: Callable[["Prepared", Record], None] | None = None,
                      storage: Storage | None = None, *, cancel: threading.Event | None = None) -> list:
        """Optimize jobs that share a ``batch_key`` in one batch; one Result per job.

        When the device runs out of memory (``torch.OutOfMemoryError``, CUDA) the
        batch fails, unless ``settings.shrink_on_oom`` opts in to one retry at
        ``OOM_RETRY_SCALE`` times the size, recorded as
        ``Prepared.retried_at_size``; if that does not fit either, ResourceError
        names both sizes. (On the CPU ``settings.max_pixels`` refuses oversized
        jobs before they start.)
        """
        first = batch[0]
        if any(batch_key(p) != batch_key(first) for p in batch[1:]):
            raise ConfigError("jobs in one batch must share styles and settings (see batch_key)")
        settings = first.job.settings
        targets = self._style_targets(first.job, first.inputs)
        snapshot = None
        if settings.save_every and storage is not None:
            def snapshot(i, iteration, scale, image):  # noqa: E306 - written while the job runs
                uri = snapshot_uri(batch[i].image_uri, iteration)
                storage.write(uri, images.encode(image, settings.format, quality=settings.quality,
                                                 dpi=settings.dpi))

        began = datetime.now(timezone.utc)
        for p in batch:
            p.began = began
        hook = None if callback is None else (lambda i, record: callback(batch[i], record))

        def run(s):
            return self.engine.run_batch([p.content for p in batch], targets, s, inits=[p.init for p in batch],
                                         callback=hook, snapshot=snapshot, cancel=cancel)

        try:
            return run(settings)
        except torch.OutOfMemoryError:
            pass  # retried below: inside this block the traceback still holds the failed attempt's tensors
        smaller = max(16, round(settings.size * OOM_RETRY_SCALE))
        if not settings.shrink_on_oom:
            self._release_memory()
            raise ResourceError(
                f"out of {self.device} memory at size {settings.size}, even with the smallest tiles; lower "
                f"max_memory or size, or set shrink_on_oom: true to retry once at size {smaller} (recorded)")
        names = ", ".join(p.job.name for p in batch)
        log.warning("%s: out of %s memory at size %d; retrying once at size %d", names, self.device,
                    settings.size, smaller)
        self._release_memory()
        try:
            results = run(settings.model_copy(update={"size": smaller}))
        except torch.OutOfMemoryError:
            results = None  # raised below, once the attempt's memory is released
        if results is None:
            self._release_memory()
            raise ResourceError(
                f"out of {self.device} memory at size {settings.size} and again at {smaller}; try size "
                f"{max(16, round(smaller * OOM_RETRY_SCALE))} or less, or a device with more memory"
            )
        for p in batch:
            p.retried_at_size = smaller
        return results

    def _release_memory(self) -> None:
        """Hand the allocator's cached blocks back to the device after an out-of-memory error."""
        if self.engine.device.type == "cuda":
            torch.cuda.empty_cache()


def batch_key(prepared: "Prepared") -> tuple:
    """Jobs with equal keys can share one optimization batch: same styles and settings. Photos of
    different shapes may share it (``Engine.run_batch`` pads them); which ones should is the
    grouping's choice (``batching.py``)."""
    styles = tuple(d["sha256"] for d in prepared.inputs.info["styles"])
    return styles, prepared.job.settings


@dataclass
class Prepared:
    """A job whose inputs are read, checksummed and decoded, ready for a device."""

    job: Job
    inputs: Inputs
    key: str
    content: Image.Image
    init: Image.Image | None
    image_uri: str
    metadata_uri: str
    started: float  # perf_counter at the start of the job
    began: datetime | None = None  # wall clock when the optimization started
    retried_at_size: int | None = None  # set when the job ran out of device memory and ran smaller


def guarded(job: Job, started: float, step: Callable[[], Any]) -> Any:
    """Run one stage of ``job``: transient storage errors (to be retried) and ``Cancelled``
    propagate, every other ``StylizeError`` becomes the job's failed ``Outcome``."""
    try:
        return step()
    except (TransientStorageError, Cancelled):
        raise
    except StylizeError as exc:
        log.info("job %s failed: %s", job.name, exc)
        return Outcome(job.name, "failed", time.perf_counter() - started, error=str(exc), kind=type(exc).__name__)


def prepare(job: Job, storage: Storage, *, skip_complete: bool = True, image_uri: str | None = None,
            metadata_uri: str | None = None, overwrite: bool | None = None) -> Prepared | Outcome:
    """The I/O before the device: check the outputs, read and checksum inputs, skip a complete
    job, decode.

    Needs no device, so a catalog can prepare the next jobs while the device
    computes. Returns a ``Prepared`` job, or the job's ``Outcome`` when it is
    skipped, refused by the manifest, writes outside its output root or over
    an input or a file stylize did not write (``outputs.claim``; ``overwrite``
    as there), or has unusable inputs.
    """
    started = time.perf_counter()

    def step() -> Prepared | Outcome:
        if job.problem is not None:
            raise ConfigError(job.problem)
        targets = (image_uri or job.image_uri, metadata_uri or job.metadata_uri)
        for uri in targets:
            check_below(job.output, uri)
        meta = claim(job, storage, *targets, overwrite=overwrite)
        inputs = read_inputs(job, storage)
        key = key_for(job, inputs)
        if skip_complete and metadata.is_complete(storage, job, key, meta):
            return Outcome(job.name, "skipped", time.perf_counter() - started, output=job.image_uri)
        with about(job, "content"):
            content = images.decode(inputs.content, name=job.content)
        init = None
        if inputs.init is not None:
            with about(job, "settings.init"):
                init = images.decode(inputs.init, name=init_uri(job))
        return Prepared(job, inputs, key, content, init, *targets, started)

    return guarded(job, started, step)


#: Times ``finish`` writes a job's image and metadata again when another run replaced the image meanwhile.
CONCURRENT_REWRITES = 3


def finish(prepared: Prepared, result, storage: Storage, *, thumbnails: bool = True) -> Outcome:
    """Write a pending metadata document, the image, its thumbnails (``thumbnails.py``), then the
    metadata (its presence, complete, means the job is done).

    The pending document replaces metadata left by an earlier run (other
    settings or inputs): it must never sit beside an image it does not
    describe, even if this process dies between two writes.
    """
    job = prepared.job
    # 16-bit formats take the optimized float image, not its 8-bit rendering.
    pixels = getattr(result, "pixels", None)
    deep = job.settings.format in images.DEEP_FORMATS and pixels is not None
    data = images.encode(pixels if deep else result.image, job.settings.format, quality=job.settings.quality,
                         dpi=job.settings.dpi)
    thumbs = None
    for _ in range(1 + CONCURRENT_REWRITES):
        pending = metadata.pending_metadata(job.name, prepared.image_uri)
        storage.write(prepared.metadata_uri, metadata.encode(pending), content_type="application/json")
        info = storage.write(prepared.image_uri, data, content_type=images.MEDIA_TYPES[job.settings.format])
        if thumbnails:  # written before the metadata, so a complete job has them
            thumbs = write_thumbnails(storage, job.output, job.name, result.image, prepared.content,
                                      prepared.inputs.info, prepared.inputs.styles)
        meta = _metadata(prepared, result, metadata.output_record(prepared.image_uri, data, info.etag), thumbs)
        storage.write(prepared.metadata_uri, metadata.encode(meta), content_type="application/json")
        if metadata.image_matches(storage, prepared.image_uri, meta["output"]):
            break
        # Another run wrote this job's image since ours: write both again, so the last metadata
        # written describes the image beside it. (Past the last try, the mismatch stays
        # detectable: the next run finds the job incomplete.)
        log.warning("%s: its image changed while its metadata was written (another run?); writing again",
                    job.name)
    last = result.records[-1]
    return Outcome(
        job.name, "done", time.perf_counter() - prepared.started, result.seconds / result.batch,
        output=prepared.image_uri, final={"total": last.total, "content": last.content, "style": last.style, "tv": last.tv},
        iterations=last.iteration,
    )


def _metadata(prepared: Prepared, result, output: dict, thumbs: dict | None) -> dict:
    """The job's full metadata document for ``result`` written as ``output`` (an ``output_record``)."""
    job = prepared.job
    meta = metadata.build_metadata(
        job=job, key=prepared.key, inputs=prepared.inputs.info, output=output, device=result.device,
        versions=versions(job.settings.weights), started=prepared.began or datetime.now(timezone.utc),
        finished=datetime.now(timezone.utc), records=result.records,
    )
    meta["engine"] = {"precision": result.precision, "sizes": [list(s) for s in result.sizes],
                      "stopped_early": result.stopped_early, "seconds": round(result.seconds, 3),
                      # images that shared its VGG19 passes (and those seconds), and per level the (w, h) they
                      # were padded to when their shapes differed (its own sizes otherwise)
                      "batch": result.batch, "padded_sizes": [list(s) for s in result.padded_sizes],
                      # per level: tile core (None: whole image), halo, L-BFGS history, memory estimate and budget
                      "levels": result.memory, "peak_memory_bytes": result.peak_memory}
    if prepared.retried_at_size is not None:
        meta["retried_at_size"] = prepared.retried_at_size  # settings.size did not fit the device
    if thumbs is not None:
        meta["thumbnails"] = thumbs  # paths relative to the output root
    return meta
