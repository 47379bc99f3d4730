"""Exceptions whose message is meant for the user, one line each.

Every error says what was expected, what was found and where (a file, a URI,
a manifest field), so the CLI can print ``str(error)`` and nothing else.
"""

from __future__ import annotations


class StylizeError(Exception):
    """Something the user can fix; the message says what."""


class ConfigError(StylizeError):
    """A setting is out of range or names something that does not exist."""


class InputError(StylizeError):
    """An input image cannot be used (missing, not an image, too small, too large)."""


class WeightsError(StylizeError):
    """The VGG19 weights cannot be loaded."""


class OptimizationError(StylizeError):
    """The optimization diverged (NaN or inf loss)."""


class ResourceError(StylizeError):
    """The job does not fit the device (memory or pixel budget)."""


class Cancelled(StylizeError):
    """The run was interrupted (Ctrl+C, SIGTERM) and the job stopped before writing anything."""


class StorageError(StylizeError):
    """Reading or writing a URI failed."""


class TransientStorageError(StorageError):
    """A storage failure worth retrying (timeouts, throttling, 5xx)."""


class NotFoundError(StorageError):
    """The object, file or bucket does not exist."""


class ManifestError(StylizeError):
    """A manifest is invalid; ``problems`` lists every (field path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = list(problems)
        lines = [f"{path}: {message}" if path else message for path, message in self.problems]
        noun = "problem" if len(lines) == 1 else "problems"
        super().__init__(f"{source}: {len(lines)} {noun}: " + "; ".join(lines))

    def __reduce__(self):
        # Exceptions pickle as cls(*args); ours takes (source, problems), so
        # say so, or a ManifestError raised in a worker process cannot come back.
        return (type(self), (self.source, self.problems))


class PrefectApiError(StylizeError):
    """The Prefect API could not be reached or refused a request."""


class OverwriteError(StylizeError):
    """An output would replace one of the job's inputs, or a file that stylize did not write."""
