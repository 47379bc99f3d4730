"""Where a manifest may read and write: confinement to S3, and outputs kept out of the inputs.

Two rules, both checked without I/O when a manifest is loaded (and again
for an output root the caller gives):

- **Confinement.** A manifest read from S3 (uploaded to a watched bucket,
  say) may name only S3 URIs: its inputs, its output and path settings
  (``init``, ``weights``). A local path is refused with its field path
  unless it lies below a root the operator allowed (``--allow-local DIR``);
  ``stylize watch`` and the Lambda handler allow none. A local manifest
  keeps every freedom: whoever can write it can run stylize anyway.
- **No feedback.** An output root at or under a grid's content folder,
  prefix or glob root would be listed by the next run, which would
  stylize its own outputs, one level deeper each time. Refused, naming
  both fields.
- **One endpoint.** A manifest read from S3 may set ``storage.endpoint_url``
  only to the endpoint it was read from. Another host would receive the
  worker's signed requests (each one replayable against the real service for
  minutes, for any bucket and key the manifest names) and the outputs.

Local paths are compared resolved (symbolic links, ``.``, ``..``); S3
URIs by bucket and key, on ``/`` boundaries.
"""

from __future__ import annotations

import os
from typing import Iterable

from stylize.catalog.storage import has_image_extension, is_glob, is_s3, local_path, split_glob, split_s3

#: Settings values that name no file.
_KEYWORDS = {"init": ("content", "random"), "weights": ("caffe", "torchvision")}


def resolved(path: str) -> str:
    """A local path with links, ``.`` and ``..`` resolved (parts that do not exist yet kept as written)."""
    return os.path.realpath(local_path(path))


def allowed_roots(roots: Iterable[str] | None) -> tuple[str, ...]:
    """The ``--allow-local`` folders, resolved."""
    return tuple(resolved(root) for root in roots or ())


def within(inner: str, outer: str) -> bool:
    """True if ``inner`` is ``outer`` or lies below it: same bucket and a key below the prefix
    (S3), or the same resolved folder or one below it (local). Never across the two."""
    if is_s3(inner) != is_s3(outer):
        return False
    if is_s3(inner):
        (b1, k1), (b2, k2) = split_s3(inner), split_s3(outer)
        k1, k2 = k1.strip("/"), k2.strip("/")
        return b1 == b2 and (not k2 or k1 == k2 or k1.startswith(k2 + "/"))
    a, b = resolved(inner), resolved(outer)
    return os.path.commonpath([a, b]) == b


def local_refusal(uri: str, allowed: tuple[str, ...]) -> str | None:
    """Why an S3 manifest may not name ``uri`` (a resolved path or URI), or None."""
    if is_s3(uri) or any(within(uri, root) for root in allowed):
        return None
    where = f"outside the allowed local folders ({', '.join(allowed)})" if allowed else "a local path"
    return (f"{uri!r} is {where}, and a manifest read from S3 may name only s3:// URIs; "
            "use an s3:// URI, or let the operator allow the folder with --allow-local DIR")


def setting_is_path(key: str, value: object) -> bool:
    """True if the settings value ``value`` of ``key`` names a file (``init`` or ``weights``)."""
    return key in _KEYWORDS and isinstance(value, str) and value not in _KEYWORDS[key]


def listing_root(entry: str, uri: str) -> str | None:
    """The folder or prefix a grid entry lists (its glob root for a glob), or None for a named file.

    Without I/O an entry names a file only when it has an image extension
    and no trailing ``/`` (the same test the expansion makes first)."""
    if is_glob(entry):
        return split_glob(uri)[0]
    if not entry.endswith("/") and has_image_extension(uri):
        return None
    return uri


def feedback_problem(output: str, output_field: str, root: str, root_field: str) -> str | None:
    """Why writing to ``output`` would feed a grid that lists ``root``, or None."""
    if not within(output, root):
        return None
    return (f"the output {output} ({output_field}) lies in {root}, which {root_field} lists: each run would "
            f"stylize the outputs of the one before; choose an output outside {root}")


def endpoint_refusal(named: str | None, reader: str | None) -> str | None:
    """Why a manifest read from S3 through the endpoint ``reader`` may not send its requests to
    ``named`` (its ``storage.endpoint_url``), or None."""
    if named is None or named.rstrip("/") == (reader or "").rstrip("/"):
        return None
    return (f"{named!r} is not the endpoint this manifest was read from ({reader}); a manifest read "
            "from S3 may not send the worker's signed requests elsewhere: leave storage.endpoint_url "
            "out, or configure the endpoint where stylize runs (AWS_ENDPOINT_URL)")
