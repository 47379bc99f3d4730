"""stylize: batch neural style transfer (Gatys, Ecker, Bethge 2015) on VGG19.

The package is laid out by layer; imports only point downward:

- ``stylize.engine``: the algorithm on tensors (VGG19 features, losses, the optimizer);
- ``stylize.catalog``: manifests, storage, metadata and one job end to end;
- ``stylize.app``: the command line, the terminal view and the Lambda handler.

Neither the engine nor the catalog imports Prefect or rich; the Prefect flows
live in the top-level ``flows`` package. The names below are the public API;
they load on first use, so ``import stylize`` stays cheap (the Lambda handler
needs neither torch nor Prefect).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "stylize.engine.optimize",
    "Record": "stylize.engine.optimize",
    "Settings": "stylize.engine.settings",
    "Job": "stylize.catalog.manifest",
    "Manifest": "stylize.catalog.manifest",
    "load_manifest": "stylize.catalog.manifest",
    "validate": "stylize.catalog.manifest",
    "JobRunner": "stylize.catalog.jobs",
    "Storage": "stylize.catalog.storage",
    "StylizeError": "stylize.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover
    from stylize.catalog.jobs import JobRunner
    from stylize.catalog.manifest import Job, Manifest, load_manifest, validate
    from stylize.catalog.storage import Storage
    from stylize.engine.optimize import Engine, Record
    from stylize.engine.settings import Settings
    from stylize.errors import StylizeError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stylize' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
