"""Batch manifests: which images to stylize with which styles, and where results go.

A manifest is a YAML document (version 1), read from a local path or an
``s3://`` URI::

    version: 1
    output: out/demo                      # local folder or s3://bucket/prefix
    storage: {endpoint_url: ..., region: ...}   # optional, for S3
    defaults: {size: 384}                 # any stylize.engine.settings.Settings field
    pairs:
      - content: content/astronaut.png
        style: styles/starry_night.jpg
      - content: s3://photos/2026/cat.jpg
        style: [styles/starry_night.jpg, styles/shipwreck.jpg]
        style_weights: [0.7, 0.3]         # becomes Settings.style_blend
        name: cat-blend                   # default "<content stem>__<style stems>"
        settings: {iterations: 500}
    grid:                                 # cross product, for catalogs
      contents: [s3://photos/2026/]       # files, folders/prefixes or globs
      styles: [styles/starry_night.jpg]
      settings: {size: 512}

Relative paths resolve against the manifest's own folder or S3 prefix.
Settings merge as: Settings() defaults < ``defaults`` < pair/grid
``settings`` < caller overrides. ``load_manifest`` checks everything that
needs no I/O and reports every problem at once, each with its field path;
``Manifest.jobs`` streams the jobs, listing folders and prefixes lazily.

One bad pair does not stop a batch: a pair whose own settings are invalid
(``pairs[i].settings``, ``pairs[i].style_weights``) becomes a refused job
(``Job.problem``) that fails with that message while the others run. So do
the jobs of a name clash (``a.jpg`` beside ``a.png``; each failure names
every source) and a listed photo whose name cannot be an output name.
Everything else (the document's shape, ``defaults``, ``grid.settings``,
names the document gives, caller overrides, where the manifest may point:
``stylize.catalog.confine``) concerns every job or the catalog's layout, so
it invalidates the whole manifest. ``validate`` reports both kinds.

Output names are relative paths below ``output``: absolute names, URIs and
``..`` are refused. The YAML loader constructs no objects (``!!python/...``
tags are refused).
"""

from __future__ import annotations

import difflib
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterable, Iterator, Mapping

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from stylize.errors import ConfigError, ManifestError, StorageError, TransientStorageError
from stylize.engine.settings import Settings, settings_error_problems
from stylize.catalog import confine
from stylize.catalog.storage import (
    IMAGE_EXTENSIONS, Storage, child, glob_regex, has_image_extension, is_glob, is_listed_image, is_s3, join,
    local_path, output_root, parent, relative_to, split_glob,
)

VERSION = 1
# Output file extension per Settings.format.
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "tiff": "tif", "png16": "png"}
_TOP_KEYS = ("version", "output", "storage", "defaults", "pairs", "grid")
_NO_JOBS = "no jobs: the manifest has neither `pairs` nor `grid`; add at least one of them"
_NO_PAIRS = "no jobs: `pairs` is an empty list and there is no `grid`; add at least one pair"

Problem = tuple[str, str]


# --- the document ---------------------------------------------------------


def _as_list(value: Any) -> Any:
    # `style: a.jpg` is shorthand for `style: [a.jpg]`.
    return [value] if isinstance(value, str) else value


def _none_as_empty(value: Any) -> Any:
    # `settings:` with nothing after it parses as None; read it as "no settings".
    return {} if value is None else value


_Text = Annotated[str, StringConstraints(min_length=1)]
_Texts = Annotated[tuple[_Text, ...], BeforeValidator(_as_list)]
_SettingsDict = Annotated[dict[str, Any], BeforeValidator(_none_as_empty)]


def _non_empty(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("empty list; name at least one image")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageOptions(_Strict):
    """The manifest's ``storage`` block: where its S3 URIs are served from, and how
    patiently (see ``stylize.catalog.storage.Storage``; unset keeps Storage's defaults)."""

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int | None = Field(None, ge=0, le=100)  # botocore's: retries after a request's first attempt
    connect_timeout: float | None = Field(None, gt=0, le=3600)  # seconds per attempt
    read_timeout: float | None = Field(None, gt=0, le=3600)


class PairSpec(_Strict):
    """One ``pairs`` entry: a content image and one or more style images."""

    content: _Text
    style: _Texts
    style_weights: tuple[float, ...] | None = None
    name: str | None = None
    settings: _SettingsDict = {}

    _style_not_empty = field_validator("style")(_non_empty)


class GridSpec(_Strict):
    """The ``grid`` block: every content image with every style image."""

    contents: _Texts
    styles: _Texts
    settings: _SettingsDict = {}

    _contents_not_empty = field_validator("contents", "styles")(_non_empty)


# --- jobs ----------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One stylization: inputs, resolved settings and where the result goes.

    A pair with invalid settings of its own is still a job, so that it counts
    and is reported: ``problem`` says why (with field paths), ``settings`` is
    None, and running it fails with that message.
    """

    name: str  # relative output name without extension, POSIX separators
    content: str  # resolved URI: absolute local path or s3://
    styles: tuple[str, ...]  # resolved URIs
    settings: Settings | None  # fully merged; style_blend set from style_weights; None if refused
    output: str  # output root URI
    source: str  # manifest field path it came from, e.g. "pairs[2]"
    index: int  # position in expansion order (0-based), used for sharding
    problem: str | None = None  # why the manifest refuses this job

    @property
    def image_uri(self) -> str:
        """Where the stylized image goes: ``<output>/<name>.<png|jpg|webp>`` (not for a refused job)."""
        return child(self.output, f"{self.name}.{_EXTENSIONS[self.settings.format]}")

    @property
    def metadata_uri(self) -> str:
        """Where the job's metadata JSON goes: ``<output>/<name>.json``."""
        return child(self.output, f"{self.name}.json")


@dataclass(frozen=True)
class Manifest:
    """A validated manifest document, with its paths resolved.

    ``jobs`` expands it lazily; folders and prefixes are listed only then.
    """

    uri: str  # where the manifest was read from (absolute)
    base: str  # folder or S3 prefix that relative paths resolve against
    output: str  # output root URI, resolved
    storage: StorageOptions | None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    pairs: tuple[PairSpec, ...] = ()
    grid: GridSpec | None = None

    def jobs(
        self,
        storage: Storage,
        *,
        overrides: Mapping[str, Any] | None = None,
        output: str | None = None,
        clashes: Mapping[str, list[tuple[str, str]]] | None = None,
    ) -> Iterator[Job]:
        """Every job, pairs first then the grid, in a stable order.

        ``overrides`` (settings, applied last) and ``output`` (a different
        output root) come from the caller. Raises ManifestError at the first
        problem met while expanding (an unsafe name the document gives, a
        folder or glob with no images, an invalid override, an output the
        grid would list); use ``validate`` to collect all of them. Failures
        that concern single jobs come as refused jobs (``Job.problem``): a
        pair's own invalid settings, a name derived from a listed file that
        cannot be one, and every job of a name clash, each naming all the
        sources of its name. ``clashes`` (from ``survey``) saves the
        expansion that finds them. Only one S3 listing page is held at a time.
        """
        if clashes is None:
            clashes = self.survey(storage, overrides=overrides, output=output)[1]
        for job, _checks in _Expansion(self, storage, overrides, output, None, clashes=clashes).run():
            yield job

    def survey(
        self,
        storage: Storage,
        *,
        overrides: Mapping[str, Any] | None = None,
        output: str | None = None,
        shard: tuple[int, int] | None = None,
    ) -> tuple[int, dict[str, list[tuple[str, str]]]]:
        """Expand once without keeping the jobs: (jobs in ``shard``, name clashes).

        A clash maps an output name to every (field path, content URI) that
        produces it; hand it to ``jobs`` so that all of them are refused,
        the first one included. Raises as ``jobs`` does.
        """
        expansion = _Expansion(self, storage, overrides, output, None)
        count = sum(1 for job, _ in expansion.run() if in_shard(job, shard))
        return count, expansion.clashing


def load_manifest(uri: str, storage: Storage | None = None, *, allow_local: Iterable[str] | None = None) -> Manifest:
    """Read and validate the manifest at ``uri`` (local path or s3://).

    A manifest read from S3 may name local paths only below the folders in
    ``allow_local`` (see ``stylize.catalog.confine``).

    ``storage`` reads the manifest itself (default: ``Storage()``, configured
    from the environment); the manifest's own ``storage`` block applies to what
    it references, see ``storage_for``. Raises ManifestError listing every
    problem found without listing folders; transient storage errors propagate
    as TransientStorageError so callers can retry.
    """
    uri = uri if is_s3(uri) else local_path(uri)
    reader = storage or Storage()
    manifest = parse_manifest(_read(uri, reader), uri, allow_local=allow_local)
    if problem := _endpoint_problem(manifest, uri, reader):
        raise ManifestError(uri, [problem])
    return manifest


def _endpoint_problem(manifest: Manifest, uri: str, reader: Storage) -> Problem | None:
    """A manifest read from S3 that would send requests to another endpoint (see ``confine``)."""
    if not is_s3(uri) or manifest.storage is None or manifest.storage.endpoint_url is None:
        return None
    why = confine.endpoint_refusal(manifest.storage.endpoint_url, reader.client.meta.endpoint_url)
    return ("storage.endpoint_url", why) if why else None


def _read(uri: str, storage: Storage) -> bytes:
    try:
        return storage.read(uri)
    except TransientStorageError:
        raise
    except StorageError as exc:
        message = str(exc).removeprefix(f"{uri}: ")
        raise ManifestError(uri, [("", f"cannot read the manifest: {message}")]) from exc


def parse_manifest(data: bytes | str, uri: str, *, allow_local: Iterable[str] | None = None) -> Manifest:
    """Validate manifest text as if it had been read from ``uri``.

    Invalid settings of a single pair do not fail the manifest: that pair
    becomes a refused job (see ``Job.problem``).
    """
    problems: list[Problem] = []
    manifest = _parse(data, uri, problems, refuse_pairs=True, allow_local=allow_local)
    if problems:
        raise ManifestError(uri, problems)
    return manifest


def _parse(data: bytes | str, uri: str, problems: list[Problem], *, refuse_pairs: bool,
           allow_local: Iterable[str] | None = None) -> Manifest:
    """The manifest in ``data``, with its problems appended to ``problems``.

    ``refuse_pairs``: a pair's own invalid settings refuse that job (True) or
    are problems too (False). ``allow_local``: local folders a manifest read
    from S3 may name (see ``stylize.catalog.confine``). ManifestError only
    when the text is no YAML mapping.
    """
    raw = _parse_yaml(data, uri)
    base = parent(uri)
    text_problems = _text_problems(raw)
    if text_problems:  # NUL or control characters: nothing else is looked at, no path is resolved
        problems += text_problems
        return Manifest(uri=uri, base=base, output="", storage=None)
    _check_top(raw, problems)
    output = _parse_output(raw, base, problems)
    storage_options = None
    if raw.get("storage") is not None:
        storage_options = _validate_model(StorageOptions, raw["storage"], "storage", problems)
    defaults = raw.get("defaults")
    if defaults is None:
        defaults = {}
    elif not isinstance(defaults, dict):
        problems.append(("defaults", f"expected a mapping of settings, found {_kind(defaults)}"))
        defaults = {}
    indexed = _parse_pairs(raw, problems)
    grid = None
    if raw.get("grid") is not None:
        grid = _validate_model(GridSpec, raw["grid"], "grid", problems)
    listed = raw.get("pairs")
    if not (isinstance(listed, list) and listed) and raw.get("grid") is None:
        problems.append(("", _NO_PAIRS if isinstance(raw.get("pairs"), list) else _NO_JOBS))

    manifest = Manifest(
        uri=uri, base=base, output=output, storage=storage_options,
        defaults=defaults, pairs=tuple(pair for _, pair in indexed), grid=grid,
    )
    if is_s3(uri):
        problems += _confinement(manifest, indexed, confine.allowed_roots(allow_local))
    if output:
        problems += _feedback(manifest, output, "output")
    # Pairs (settings, weights, names) and the grid's settings need no I/O:
    # check them now so that one run reports everything.
    expansion = _Expansion(manifest, None, None, None, problems, refuse_pairs=refuse_pairs)
    expansion.check_defaults()
    for _ in expansion.pairs(indexed):
        pass
    expansion.grid_settings()
    return manifest


def _check_top(raw: dict, problems: list[Problem]) -> None:
    for key in raw:
        if key not in _TOP_KEYS:
            problems.append((str(key), _unknown_key(str(key), _TOP_KEYS, "key")))
    version = raw.get("version")
    if "version" not in raw:
        problems.append(("version", f"missing; add `version: {VERSION}`"))
    elif version != VERSION or isinstance(version, bool):
        problems.append(("version", f"expected {VERSION}, found {version!r}; this stylize reads version {VERSION} manifests"))


def _parse_output(raw: dict, base: str, problems: list[Problem]) -> str:
    if "output" not in raw:
        problems.append(("output", "missing; name a local folder or s3://bucket/prefix for the results"))
    elif not isinstance(raw["output"], str) or not raw["output"].strip():
        problems.append(("output", f"expected a folder or s3://bucket/prefix, found {raw['output']!r}"))
    else:
        try:
            return output_root(join(base, raw["output"]))
        except StorageError as exc:
            problems.append(("output", str(exc)))
    return ""


def _parse_pairs(raw: dict, problems: list[Problem]) -> list[tuple[int, PairSpec]]:
    """(index in the document, pair) of the valid ``pairs`` entries; the others are problems."""
    raw_pairs = raw.get("pairs")
    if raw_pairs is None:
        return []
    if not isinstance(raw_pairs, list):
        problems.append(("pairs", f"expected a list of pairs, found {_kind(raw_pairs)}"))
        return []
    indexed = []
    for i, item in enumerate(raw_pairs):
        pair = _validate_model(PairSpec, item, f"pairs[{i}]", problems)
        if pair is not None:
            indexed.append((i, pair))
    return indexed


def _text_problems(raw: Any) -> list[Problem]:
    """A problem per string of the document (keys included) with a NUL or control character:
    no path or name may hold one, and a name with an escape sequence would reach terminals."""
    problems: list[Problem] = []
    stack: list[tuple[str, Any]] = [("", raw)]
    while stack:  # a loop, not recursion: documents may nest deeply
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and _control(key):
                    problems.append((path, f"key {key!r} contains {_control(key)}"))
                stack.append((where, item))
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", item) for i, item in enumerate(value)]
        elif isinstance(value, str) and _control(value):
            problems.append((path, f"{value!r} contains {_control(value)}; paths and names may not"))
    return sorted(problems)


def _control(text: str) -> str | None:
    """What control character ``text`` holds ("a NUL byte", "the control character U+001B"), or None."""
    for c in text:
        if c == "\x00":
            return "a NUL byte"
        if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0:
            return f"the control character U+{ord(c):04X}"
    return None


def _confinement(manifest: Manifest, indexed: list[tuple[int, PairSpec]], allowed: tuple[str, ...]) -> list[Problem]:
    """The fields of a manifest read from S3 that name local paths outside ``allowed``."""
    named: list[tuple[str, str]] = [("output", manifest.output)] if manifest.output else []
    for i, pair in indexed:
        named.append((f"pairs[{i}].content", pair.content))
        named += _style_fields(f"pairs[{i}]", pair.style)
        named += _path_settings(f"pairs[{i}].settings", pair.settings)
    if manifest.grid is not None:
        named += [(f"grid.contents[{j}]", e) for j, e in enumerate(manifest.grid.contents)]
        named += [(f"grid.styles[{j}]", e) for j, e in enumerate(manifest.grid.styles)]
        named += _path_settings("grid.settings", manifest.grid.settings)
    named += _path_settings("defaults", manifest.defaults)
    problems = []
    for path, entry in named:
        try:
            uri = entry if path.endswith(".weights") else join(manifest.base, entry)
        except StorageError:
            continue  # reported where the path is resolved
        why = confine.local_refusal(uri if is_s3(uri) else local_path(uri), allowed)
        if why:
            problems.append((path, why))
    return problems


def _style_fields(src: str, styles: tuple[str, ...]) -> list[tuple[str, str]]:
    if len(styles) == 1:
        return [(f"{src}.style", styles[0])]
    return [(f"{src}.style[{k}]", style) for k, style in enumerate(styles)]


def _path_settings(src: str, values: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(f"{src}.{key}", value) for key, value in values.items() if confine.setting_is_path(key, value)]


def _feedback(manifest: Manifest, output: str, output_field: str) -> list[Problem]:
    """Refuse an output root that a grid entry would list: the next run would stylize the outputs."""
    if manifest.grid is None:
        return []
    problems = []
    for j, entry in enumerate(manifest.grid.contents):
        try:
            root = confine.listing_root(entry, join(manifest.base, entry))
        except StorageError:
            continue
        why = root and confine.feedback_problem(output, output_field, root, f"grid.contents[{j}]")
        if why:
            problems.append((output_field, why))
    return problems


def storage_for(manifest: Manifest) -> Storage:
    """A Storage configured by the manifest's ``storage`` block (or the environment)."""
    options = manifest.storage
    if options is None:
        return Storage()
    tuning = {k: v for k in ("max_attempts", "connect_timeout", "read_timeout")
              if (v := getattr(options, k)) is not None}
    return Storage(endpoint_url=options.endpoint_url, region=options.region, **tuning)


def validate(
    uri: str, storage: Storage | None = None, *, check_inputs: bool = True,
    allow_local: Iterable[str] | None = None,
) -> tuple[int, list[Problem]]:
    """Load and fully expand a manifest without running it: (number of jobs, problems).

    Collects every problem instead of stopping at the first, the invalid
    settings of single pairs included (a run refuses only those jobs). With
    ``check_inputs`` each referenced content and style image is checked to
    exist (images found by listing a folder exist by construction). ``storage``
    serves both the manifest and its inputs; without it the manifest is read
    with ``Storage()`` and its inputs with ``storage_for(manifest)``.
    """
    uri = uri if is_s3(uri) else local_path(uri)
    problems: list[Problem] = []
    try:
        reader = storage or Storage()
        data = _read(uri, reader)
        manifest = _parse(data, uri, problems, refuse_pairs=True, allow_local=allow_local)
    except ManifestError as exc:
        return 0, exc.problems
    # Checked before anything is listed: the expansion would talk to that endpoint.
    endpoint = [p] if (p := _endpoint_problem(manifest, uri, reader)) else []
    if problems:  # the document itself is invalid: report that, and the pairs' own settings
        problems = []
        _parse(data, uri, problems, refuse_pairs=False, allow_local=allow_local)
        return 0, problems + endpoint
    if endpoint:
        return 0, endpoint
    storage = storage or storage_for(manifest)
    reported: set[Problem] = set()
    found: dict[str, str | None] = {}  # input URI or weights file -> why it cannot be used
    count = 0
    for job, checks in _Expansion(manifest, storage, None, None, problems, refuse_pairs=False).run():
        count += 1
        if not check_inputs:
            continue
        for problem in [*_input_problems(manifest, job, checks, storage, found), *_output_problems(job)]:
            if problem not in reported:
                reported.add(problem)
                problems.append(problem)
    if count == 0 and not problems:
        problems.append(("", _NO_JOBS))
    return count, problems


def _input_problems(manifest: Manifest, job: Job, checks: list[tuple[str, str]], storage: Storage,
                    found: dict[str, str | None]) -> Iterator[Problem]:
    """(field path, why) for each input of ``job`` that is missing, and for a weights file that
    is not one; ``found`` remembers the answers, so each URI is asked about once."""
    for path, target in checks:
        if target not in found:
            try:
                found[target] = None if storage.exists(target) else f"{target}: not found"
            except StorageError as exc:
                found[target] = str(exc)
        if found[target]:
            yield path, found[target]
    weights = job.settings.weights if job.settings is not None else None
    if confine.setting_is_path("weights", weights):
        if weights not in found:
            from stylize.engine.features import check_weights_file  # torch: only when a file is named
            from stylize.errors import WeightsError

            try:
                check_weights_file(weights)
                found[weights] = None
            except WeightsError as exc:
                found[weights] = str(exc)
        if found[weights]:
            yield _weights_field(manifest, job), found[weights]


def _output_problems(job: Job) -> Iterator[Problem]:
    """(field path, why) when an output of ``job`` would replace one of its inputs (a run refuses
    the job; see ``outputs.refuse_inputs``)."""
    from stylize.catalog.outputs import refuse_inputs  # outputs builds on this module
    from stylize.errors import OverwriteError

    if job.settings is None:  # its settings are invalid: reported as such
        return
    try:
        refuse_inputs(job)
    except OverwriteError as exc:
        yield job.source, str(exc).removeprefix(f"{job.source}: ")


def _weights_field(manifest: Manifest, job: Job) -> str:
    """The field path that set ``job``'s weights."""
    if job.source.startswith("pairs["):  # validate expands only documents whose pairs are all valid
        if "weights" in manifest.pairs[int(job.source[6:-1])].settings:
            return f"{job.source}.settings.weights"
    elif manifest.grid is not None and "weights" in manifest.grid.settings:
        return "grid.settings.weights"
    return "defaults.weights"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``: this process runs jobs whose index % n == i."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match:
        raise ConfigError(f"shard {text!r}: expected 'i/n' with 0 <= i < n, e.g. '0/4'")
    i, n = int(match[1]), int(match[2])
    if n < 1 or i >= n:
        raise ConfigError(f"shard {text!r}: expected 0 <= i < n and n >= 1, found i={i}, n={n}")
    return i, n


def in_shard(job: Job, shard: tuple[int, int] | None) -> bool:
    """True if ``job`` belongs to ``shard`` (None: every job does).

    Stable for a given listing: shard by position in expansion order.
    """
    if shard is None:
        return True
    i, n = shard
    return job.index % n == i


# --- expansion -------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    """One source of settings in the merge, with the field path of its mapping."""

    path: str
    values: Mapping[str, Any]
    aliases: Mapping[str, str] = field(default_factory=dict)  # setting -> field path


class _Expansion:
    """Turns a Manifest into jobs; reports problems by raising or by collecting.

    ``problems=None`` raises ManifestError at the first problem (streaming
    use); a list collects them all (validation). With ``refuse_pairs`` the
    problems of single jobs (a pair's own settings, a listed photo's name, a
    name clash) make refused jobs instead of being reported. Name clashes
    are known only once every name was seen: without ``clashes`` they are
    collected in ``clashing`` (a survey), with them every job of a clashing
    name is refused. Yields ``(job, checks)`` where ``checks`` are the
    (field path, URI) inputs not known to exist.
    """

    def __init__(self, manifest: Manifest, storage: Storage | None, overrides, output, problems, *,
                 refuse_pairs: bool = True, clashes: Mapping[str, list[tuple[str, str]]] | None = None):
        self.m = manifest
        self.storage = storage
        self.problems = problems
        self.refuse_pairs = refuse_pairs
        self._reported: set[Problem] = set()
        self.defaults = _Layer("defaults", _resolve_paths(manifest.defaults, manifest.base))
        self.overrides = _Layer("overrides", _resolve_paths(dict(overrides or {}), os.getcwd()))
        self.output = manifest.output
        if output is not None:
            try:
                self.output = output_root(output)
            except StorageError as exc:
                self.report([("output", str(exc))])
            else:
                self.report(_feedback(manifest, self.output, "--output"))
        # name -> (field path, content URI): duplicates must name both sources.
        self.seen: dict[str, tuple[str, str]] = {}
        self.clashes = clashes  # known before (streaming): every job of these names is refused
        self.clashing: dict[str, list[tuple[str, str]]] = {}  # found in this expansion
        self.index = 0

    def report(self, problems: list[Problem]) -> None:
        if not problems:
            return
        if self.problems is None:
            raise ManifestError(self.m.uri, problems)
        for problem in problems:
            if problem not in self._reported:
                self._reported.add(problem)
                self.problems.append(problem)

    def run(self) -> Iterator[tuple[Job, list[tuple[str, str]]]]:
        yield from self.pairs()
        if self.m.grid is not None:
            yield from self.grid()

    def check_defaults(self) -> None:
        self.report(_merge([self.defaults, self.overrides])[1])

    def pairs(self, indexed=None) -> Iterator[tuple[Job, list[tuple[str, str]]]]:
        """Jobs of the ``pairs`` list; ``indexed`` (index, pair) keeps field paths
        right when the document had invalid pairs."""
        for i, pair in indexed if indexed is not None else enumerate(self.m.pairs):
            yield from self._pair(f"pairs[{i}]", pair)

    def _pair(self, src: str, pair: PairSpec) -> Iterator[tuple[Job, list[tuple[str, str]]]]:
        problems: list[Problem] = []
        content = self._resolve(pair.content, f"{src}.content", problems)
        style_paths = [path for path, _ in _style_fields(src, pair.style)]
        styles = [self._resolve(style, path, problems) for path, style in zip(style_paths, pair.style)]
        settings, own, shared = self._pair_settings(src, pair, styles)
        problems += shared
        explicit = pair.name is not None
        name = pair.name if explicit else _pair_name(content, styles)
        named, refusal = self.claim(name, f"{src}.name" if explicit else src, src, content, derived=not explicit)
        problems += named
        if problems:
            self.report(problems)
            return
        refusals = [f"{path}: {message}" for path, message in own] + ([refusal] if refusal else [])
        if refusals:
            yield self.job(name, content, tuple(styles), None, src, "; ".join(refusals)), []
            return
        checks = [(f"{src}.content", content), *zip(style_paths, styles)]
        yield self.job(name, content, tuple(styles), settings, src), checks

    def _resolve(self, entry: str, path: str, problems: list[Problem]) -> str:
        try:
            return join(self.m.base, entry)
        except StorageError as exc:
            problems.append((path, str(exc)))
            return entry

    def _pair_settings(self, src: str, pair: PairSpec, styles: list[str]):
        """(settings or None, the pair's own problems, problems of settings every job shares)."""
        layers = [self.defaults, _Layer(f"{src}.settings", _resolve_paths(pair.settings, self.m.base))]
        invalid: list[Problem] = []  # of the merged settings, wherever the bad value came from
        if pair.style_weights is not None:
            weights_path = f"{src}.style_weights"
            if len(pair.style_weights) != len(styles):
                invalid.append((weights_path, f"expected {len(styles)} weights, one per style image, found {len(pair.style_weights)}"))
            elif "style_blend" in pair.settings:
                invalid.append((weights_path, "given together with settings.style_blend; keep one of them"))
            else:
                layers.append(_Layer(src, {"style_blend": pair.style_weights}, {"style_blend": weights_path}))
        layers.append(self.overrides)
        settings, errors = _merge(layers)
        invalid += errors
        if settings is not None and settings.style_blend is not None and len(settings.style_blend) != len(styles):
            invalid.append((_owner(layers, "style_blend"), f"style_blend has {len(settings.style_blend)} weights but {src} has {len(styles)} style images"))
        # Only the pair's own mistakes refuse just its job; one in `defaults` or
        # the caller's overrides concerns every job.
        own = [p for p in invalid if self.refuse_pairs and _within(p[0], src)]
        return settings, own, [p for p in invalid if p not in own]

    def grid_settings(self) -> Settings | None:
        grid = self.m.grid
        if grid is None:
            return None
        layers = [self.defaults, _Layer("grid.settings", _resolve_paths(grid.settings, self.m.base)), self.overrides]
        settings, problems = _merge(layers)
        if settings is not None and settings.style_blend is not None and len(settings.style_blend) != 1:
            problems.append((_owner(layers, "style_blend"), "grid jobs use one style image each, so style_blend must have one weight or be left out"))
        self.report(problems)
        return None if problems else settings

    def grid(self) -> Iterator[tuple[Job, list[tuple[str, str]]]]:
        settings = self.grid_settings()
        grid = self.m.grid
        # Styles are few: materialize them. Contents may be a huge prefix: stream.
        styles = []
        for j, entry in enumerate(grid.styles):
            path = f"grid.styles[{j}]"
            styles += [(uri, path, listed) for uri, _rel, listed in self.sources(entry, path)]
        if settings is None or not styles:
            return
        for c, entry in enumerate(grid.contents):
            src = f"grid.contents[{c}]"
            for content, rel, listed in self.sources(entry, src):
                for style, style_path, style_listed in styles:
                    name = f"{rel}__{_stem(style)}"
                    problems, refusal = self.claim(name, src, src, content, derived=True)
                    if problems:
                        self.report(problems)
                        continue
                    if refusal:  # this photo's jobs fail, the catalog goes on
                        yield self.job(name, content, (style,), None, src, refusal), []
                        continue
                    checks = [] if listed else [(src, content)]
                    if not style_listed:
                        checks.append((style_path, style))
                    yield self.job(name, content, (style,), settings, src), checks

    def sources(self, entry: str, path: str) -> Iterator[tuple[str, str, bool]]:
        """(URI, name stem relative to its listing root, found by listing) per image."""
        try:
            uri = join(self.m.base, entry)
        except StorageError as exc:
            self.report([(path, str(exc))])
            return
        found = 0
        try:
            for item in self._candidates(entry, uri):
                found += 1
                yield item
        except TransientStorageError:
            raise
        except StorageError as exc:
            self.report([(path, str(exc))])
            return
        if not found:
            self.report([(path, f"{entry!r} ({uri}) matched no images; expected a file, or a folder or glob "
                                f"with files ending {', '.join(IMAGE_EXTENSIONS)}")])

    def _candidates(self, entry: str, uri: str) -> Iterator[tuple[str, str, bool]]:
        if is_glob(entry):
            root, pattern = split_glob(uri)
            regex = glob_regex(pattern)
            for item in self.storage.list(root):
                rel = relative_to(item, root)
                if regex.fullmatch(rel) and is_listed_image(rel):
                    yield item, _listed_name(rel), True
        elif not entry.endswith("/") and (has_image_extension(uri) or self.storage.exists(uri)):
            # A named file: the name is its stem. Existence is checked by
            # validate() or when the job reads it, not here (one request per file).
            yield uri, _strip_ext(posixpath.basename(uri)), False
        else:
            for item in self.storage.list(uri):
                rel = relative_to(item, uri)
                if is_listed_image(rel):
                    yield item, _listed_name(rel), True

    def claim(self, name: str, name_path: str, src: str, content: str, *,
              derived: bool) -> tuple[list[Problem], str | None]:
        """(problems, refusal) for output name ``name``: a name that cannot be used invalidates the
        manifest when the document gives it, or (``refusal``, when jobs fail alone) fails only its
        job when it comes from a listed file or clashes with another job's."""
        why = _unsafe_name(name)
        if why:
            origin = f" (derived from {content})" if derived else ""
            message = f"output name {name!r}{origin} {why}"
            if derived and src.startswith("grid") and self.refuse_pairs:
                return [], message
            return [(name_path, message)], None
        other = self.seen.get(name)
        if other is None:
            self.seen[name] = (src, content)
            if not (self.clashes and name in self.clashes):
                return [], None
        if not self.refuse_pairs:  # validation: every clash is a problem
            return [(name_path, _twice(name, [other, (src, content)]))], None
        if self.clashes is None:  # a survey: collected, for the expansion that refuses them
            self.clashing.setdefault(name, [other]).append((src, content))
            return [], None
        # Known from the survey; or the listing changed since, and only this second one is caught.
        return [], _twice(name, self.clashes.get(name) or [other, (src, content)])

    def job(self, name: str, content: str, styles: tuple[str, ...], settings: Settings | None, src: str,
            problem: str | None = None) -> Job:
        job = Job(name=name, content=content, styles=styles, settings=settings,
                  output=self.output, source=src, index=self.index, problem=problem)
        self.index += 1
        return job


# --- helpers -------------------------------------------------------------


def _merge(layers: list[_Layer]) -> tuple[Settings | None, list[Problem]]:
    """Settings from the layers, later ones winning; problems name the layer that set the value."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer.values)
    try:
        return Settings.model_validate(merged), []
    except ValidationError as exc:
        problems = []
        for err, (loc_text, message) in zip(exc.errors(), settings_error_problems(exc)):
            key = err["loc"][0] if err["loc"] else None
            owner = next((l for l in reversed(layers) if key in l.values), None)
            if owner is None:  # a whole-model check: blame the most specific layer with values
                owner = next((l for l in reversed(layers) if l.values), layers[-1])
            if key is None or key not in owner.values:
                path = owner.path
            elif key in owner.aliases:
                path = owner.aliases[key] + loc_text[len(str(key)):]
            else:
                path = f"{owner.path}.{loc_text}"
            if err["type"] == "extra_forbidden":
                message = _unknown_key(str(key), tuple(Settings.model_fields), "setting", list_all=False)
            problems.append((path, message + _found(err)))
        return None, problems


def _within(path: str, src: str) -> bool:
    """True if the field path ``path`` is ``src`` or inside it (``pairs[2].settings.size``)."""
    return path == src or path.startswith((f"{src}.", f"{src}["))


def _owner(layers: list[_Layer], key: str) -> str:
    for layer in reversed(layers):
        if key in layer.values:
            return layer.aliases.get(key, f"{layer.path}.{key}")
    return layers[-1].path


def _validate_model(model: type[BaseModel], value: Any, prefix: str, problems: list[Problem]):
    if not isinstance(value, dict):
        fields = ", ".join(model.model_fields)
        problems.append((prefix, f"expected a mapping with keys from {fields}, found {_kind(value)}"))
        return None
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        for err, (path, message) in zip(exc.errors(), settings_error_problems(exc, prefix)):
            if err["type"] == "extra_forbidden":
                message = _unknown_key(str(err["loc"][0]), tuple(model.model_fields), "key")
            elif err["type"] == "missing":
                message = "missing; this key is required"
            problems.append((path, message + _found(err)))
        return None


def _found(err: Mapping[str, Any]) -> str:
    """", found <value>" for a pydantic error on a single value (not for a whole mapping)."""
    # Our own validators ("value_error") already say what they found.
    if err["type"] in ("missing", "extra_forbidden", "value_error") or not err["loc"]:
        return ""
    if isinstance(err.get("input"), (dict, list, tuple)):
        return ""
    return f", found {err.get('input')!r}"


def _unknown_key(key: str, known: tuple[str, ...], what: str, *, list_all: bool = True) -> str:
    message = f"unknown {what}"
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    if list_all:
        message += f" (expected one of: {', '.join(known)})"
    elif not close:
        message += " (see stylize.engine.settings.Settings for the list)"
    return message


def _resolve_paths(values: Mapping[str, Any], base: str) -> dict[str, Any]:
    """Resolve path-valued settings (``init``, ``weights``) like any manifest path.

    Only values that look like paths (a separator, a dot, ``~``) are touched,
    so keywords ("content", "caffe", ...) pass unchanged. ``weights`` is read
    from the local disk, so it is not resolved against an S3 prefix.
    """
    out = dict(values)
    for key in ("init", "weights"):
        value = out.get(key)
        if not isinstance(value, str) or not any(c in value for c in "/\\.~"):
            continue
        if key == "weights" and is_s3(base) and not os.path.isabs(value):
            continue
        try:
            out[key] = join(base, value)
        except StorageError:
            pass  # left as written; Settings or the engine reports it
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader (tags that construct objects are refused) that also refuses duplicate keys."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    # A repeated key silently wins in YAML; in a manifest it is almost always
    # a mistake (two `iterations:` lines), so refuse it with its line number.
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` may be overridden by explicit keys
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark,
                )
            seen.add(key)
        except TypeError:
            pass  # unhashable key: SafeLoader reports it below
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(data: bytes | str, uri: str) -> dict:
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(uri, [("", f"not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8")]) from None
    try:
        raw = yaml.load(data, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ManifestError(uri, [("", _yaml_message(exc))]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ManifestError(uri, [("", "not a manifest: collections nested too deeply (hundreds of levels); "
                                       "a manifest nests a few levels")]) from None
    if not isinstance(raw, dict):
        raise ManifestError(uri, [("", f"expected a mapping with keys {', '.join(_TOP_KEYS)}, found {_kind(raw)}")])
    return raw


def _yaml_message(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    message = f"not valid YAML: {problem}{where}"
    if "constructor for the tag" in problem:
        message += "; tags that construct objects are not allowed"
    return message


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _unsafe_name(name: str) -> str | None:
    """Why ``name`` cannot be an output name below the output root, or None."""
    if not name:
        return "is empty"
    control = _control(name)
    if control:
        return f"contains {control}"
    if "\\" in name:
        return "contains a backslash; use / for subfolders"
    if "://" in name:
        return "is a URI; expected a path relative to the output folder (outputs go only below `output`)"
    if name.startswith("/"):
        return "is absolute; expected a path relative to the output folder"
    parts = name.split("/")
    if ".." in parts:
        return "contains '..' and would escape the output folder"
    if any(part in ("", ".") for part in parts):
        return "has an empty or '.' path component"
    return None


def _twice(name: str, sources: list[tuple[str, str]]) -> str:
    """The message of a name clash, naming every source."""
    times = "twice" if len(sources) == 2 else f"{len(sources)} times"
    by = ", ".join(f"by {src} ({content})" for src, content in sources[:-1])
    src, content = sources[-1]
    return (f"output name {name!r} is produced {times}: {by} and by {src} ({content}); "
            "give one a distinct `name:` or rename a file")


def _stem(uri: str) -> str:
    return _strip_ext(posixpath.basename(uri.rstrip("/")))


def _listed_name(relative: str) -> str:
    """The name stem of a listed file: S3 keys may hold ``//`` (``x//y.png``), which names
    the same output as ``x/y.png``; a clash between the two fails both jobs."""
    return _strip_ext(re.sub("/{2,}", "/", relative))


def _strip_ext(path: str) -> str:
    return posixpath.splitext(path)[0]


def _pair_name(content: str, styles: list[str]) -> str:
    return f"{_stem(content)}__{'+'.join(_stem(s) for s in styles)}"
