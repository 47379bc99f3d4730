"""What a job writes, and what it may write over: never an input, only files stylize wrote.

A job writes its image, its metadata sidecar (``NAME.json``), its thumbnail
(``_thumbs/NAME.jpg``) and, with ``save_every``, snapshots
(``NAME.iterNNNNN.EXT``). Before it reads anything, ``claim`` refuses the job
(``OverwriteError``) when:

* one of these resolves to one of the job's inputs (content, styles, init
  image), whatever ``overwrite`` says. Local paths are compared resolved
  (symbolic links, ``.``, ``..``; hard links by inode), S3 URIs by bucket and key;
* one of them exists and stylize did not write it, unless ``overwrite``
  (``stylize image --overwrite``). The sidecar is stylize's when it is JSON
  with ``schema: stylize.catalog.metadata/v1``. The image and the snapshots
  are stylize's when that sidecar names the image (its ``output.uri`` ends in
  the image's file name): a job writes a pending sidecar before its image
  (``jobs.finish``), so an image left by a crash is still recognised. An image
  changed behind the catalog's back stays stylize's slot: its checksum no
  longer matches, so the job is incomplete and runs again. ``_thumbs/`` is
  stylize's own folder.
"""

from __future__ import annotations

import json
import os
from typing import Any

from stylize.catalog import metadata
from stylize.catalog.manifest import Job
from stylize.catalog.storage import Storage, child, is_s3, local_path, split_s3
from stylize.catalog.thumbnails import output_thumb
from stylize.errors import NotFoundError, OverwriteError

__all__ = ["claim", "init_uri", "job_inputs", "refuse_inputs", "resolved", "snapshot_uri", "snapshot_uris"]


def init_uri(job: Job) -> str | None:
    """The URI of the job's starting image, when ``settings.init`` names one."""
    return None if job.settings.init in ("content", "random") else job.settings.init


def job_inputs(job: Job) -> dict[str, str]:
    """The job's inputs by field: ``content``, ``style`` (or ``style[i]``), ``settings.init``."""
    inputs = {"content": job.content}
    for i, uri in enumerate(job.styles):
        inputs[f"style[{i}]" if len(job.styles) > 1 else "style"] = uri
    if (init := init_uri(job)) is not None:
        inputs["settings.init"] = init
    return inputs


def snapshot_uri(image_uri: str, iteration: int) -> str:
    """``out/a/b.png`` -> ``out/a/b.iter00100.png``; never the final name."""
    stem, dot, ext = image_uri.rpartition(".")
    return f"{stem}.iter{iteration:05d}{dot}{ext}"


def snapshot_uris(job: Job, image_uri: str) -> list[str]:
    """Every snapshot the job may write (iterations count from 1 on each level)."""
    every = job.settings.save_every
    return [snapshot_uri(image_uri, it) for it in range(every, job.settings.iterations + 1, every)] if every else []


def resolved(uri: str) -> str:
    """One spelling per file: a local path with links, ``.`` and ``..`` resolved; an S3 URI as is."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return f"s3://{bucket.lower()}/{key}"
    return os.path.realpath(local_path(uri))


def claim(job: Job, storage: Storage, image_uri: str | None = None, metadata_uri: str | None = None,
          *, overwrite: bool | None = None) -> dict | None:
    """Check that ``job`` may write its outputs (see the module); returns its metadata document,
    or None when there is none, so the completeness check need not read it again.

    ``overwrite=None``: the caller offers no way to overwrite (a catalog);
    False: it does (``stylize image --overwrite``), and the error says so.
    """
    image_uri, metadata_uri = image_uri or job.image_uri, metadata_uri or job.metadata_uri
    refuse_inputs(job, image_uri, metadata_uri)
    snapshots = snapshot_uris(job, image_uri)
    exists, meta = _sidecar(storage, metadata_uri)
    if overwrite:
        return meta if metadata.is_stylize_metadata(meta) else None
    if exists and not metadata.is_stylize_metadata(meta):
        _refuse(job, metadata_uri, "is not stylize metadata (no schema " + metadata.SCHEMA + ")", overwrite)
    if metadata.names_image(meta, image_uri):
        return meta
    for uri in (image_uri, *snapshots):
        if storage.exists(uri):
            _refuse(job, uri, f"has no stylize metadata naming it at {metadata_uri}", overwrite)
    return meta


def refuse_inputs(job: Job, image_uri: str | None = None, metadata_uri: str | None = None) -> None:
    """OverwriteError when one of ``job``'s outputs (image, metadata, thumbnail, snapshots) would
    land on one of its inputs. Reads nothing from storage (local paths are resolved), so
    ``validate`` can ask it too."""
    image_uri, metadata_uri = image_uri or job.image_uri, metadata_uri or job.metadata_uri
    targets = {"image": image_uri, "metadata": metadata_uri,
               "thumbnail": child(job.output, output_thumb(job.name))}
    snapshots = snapshot_uris(job, image_uri)
    inputs = {resolved(uri): (field, uri) for field, uri in job_inputs(job).items()}
    folder = os.path.dirname(resolved(targets["image"])) if snapshots and not is_s3(targets["image"]) else None
    for role, uri in targets.items():
        hit = inputs.get(resolved(uri)) or _same_local_file(uri, inputs.values())
        if hit is not None:
            _input_error(job, role, uri, hit)
    for uri in snapshots:
        spelled = os.path.join(folder, os.path.basename(uri)) if folder else resolved(uri)
        if (hit := inputs.get(spelled)) is not None:
            _input_error(job, "snapshot", uri, hit)


def _same_local_file(uri: str, inputs) -> tuple[str, str] | None:
    """The input that is ``uri`` under another name (a hard link), if both exist locally."""
    if is_s3(uri) or not os.path.exists(local_path(uri)):
        return None
    for field, other in inputs:
        if not is_s3(other) and os.path.exists(local_path(other)) and os.path.samefile(local_path(uri),
                                                                                     local_path(other)):
            return field, other
    return None


def _input_error(job: Job, role: str, uri: str, hit: tuple[str, str]) -> None:
    field, source = hit
    where = f"{job.source}: " if job.source else ""
    raise OverwriteError(f"{where}output {role} {uri} is the job's {field} input ({source}); "
                         "an input is never replaced: choose another output name or folder")


def _refuse(job: Job, uri: str, why: str, overwrite: bool | None) -> None:
    where = f"{job.source}: " if job.source else ""
    fix = "move it, or pass --overwrite to replace it" if overwrite is False else \
        "move it, or choose another output name or folder"
    raise OverwriteError(f"{where}{uri} exists and {why}; stylize replaces only files it wrote: {fix}")


def _sidecar(storage: Storage, uri: str) -> tuple[bool, Any]:
    """(exists, parsed JSON or None) of the metadata file at ``uri``."""
    try:
        data = storage.read(uri)
    except NotFoundError:
        return False, None
    try:
        return True, json.loads(data)
    except ValueError:  # not JSON, or not UTF-8
        return True, None
