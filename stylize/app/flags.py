"""The engine's command-line flags, made from ``Settings``: one source for names, types, defaults and help.

Each ``Settings`` field becomes ``--field-name``: its type gives the argparse
type (a ``Literal`` gives ``choices``, a tuple ``nargs="+"``, a bool a
switch), the first sentence of its ``description`` the help, its default the
"(default X)" note, and ``json_schema_extra`` its ``metavar`` or
``{"cli": False}`` to leave it off. Every flag defaults to None, so a flag
not given leaves the setting to the manifest or the library.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from stylize.engine.settings import Settings

#: Title of the argument group that holds the engine flags in every command's help.
GROUP_TITLE = "engine settings (defaults give a good picture at 512 px)"


@dataclass(frozen=True)
class Flag:
    """One engine flag: ``--name`` sets the ``Settings`` field ``dest``."""

    name: str
    dest: str
    help: str
    options: dict[str, Any] = field(default_factory=dict)  # argparse keywords: type, nargs, choices, ...


def engine_flags() -> list[Flag]:
    """A flag for every ``Settings`` field that is on the command line, in field order."""
    return [_flag(name, info) for name, info in Settings.model_fields.items()
            if (info.json_schema_extra or {}).get("cli", True)]


def _flag(name: str, info) -> Flag:
    extra = info.json_schema_extra or {}
    if not info.description:
        raise TypeError(f"Settings.{name} has no description; every setting needs one for its --help")
    options = _argparse_options(name, info.annotation)
    if "metavar" in extra:
        options["metavar"] = extra["metavar"]
    return Flag(name="--" + name.replace("_", "-"), dest=name, help=_help(info), options=options)


def _argparse_options(name: str, annotation: Any) -> dict[str, Any]:
    """argparse keywords for a field's type: ``int``, ``float | None``, ``tuple[float, ...]``, a Literal, bool."""
    annotation = _without_none(annotation)
    if annotation is bool:
        return {"action": "store_true", "default": None}  # None: not given, so not an override
    if typing.get_origin(annotation) is Literal:
        return {"choices": list(typing.get_args(annotation))}
    if typing.get_origin(annotation) is tuple:
        return {"type": _scalar(name, typing.get_args(annotation)[0]), "nargs": "+"}
    return {"type": _scalar(name, annotation)}


def _without_none(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _scalar(name: str, annotation: Any) -> type:
    if annotation in (int, float, str):
        return annotation
    raise TypeError(f"Settings.{name}: no command-line flag for type {annotation!r}; "
                    "expected int, float, str, bool, a Literal or a tuple of them, or mark it "
                    'json_schema_extra={"cli": False}')


def _help(info) -> str:
    """The description's first sentence, then the default unless it is None or a switch's False."""
    first = info.description.split(". ", 1)[0].rstrip(".").replace("%", "%%")  # argparse formats help with %
    if first[1:2].islower():  # "Content loss weight" -> "content loss weight"; "VGG19 ..." stays
        first = first[0].lower() + first[1:]
    default = info.default
    if default is None or default is False:
        return first
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else f"{default:g}" \
        if isinstance(default, float) else str(default)
    return f"{first} (default {shown})"


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Flags for every engine setting; unset flags keep the manifest's or the library's defaults."""
    group = parser.add_argument_group(GROUP_TITLE)
    for flag in engine_flags():
        group.add_argument(flag.name, dest=flag.dest, help=flag.help, **flag.options)


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings given on the command line, as ``Settings`` fields."""
    out = {}
    for flag in engine_flags():
        value = getattr(args, flag.dest, None)
        if value is not None:
            out[flag.dest] = tuple(value) if isinstance(value, list) else value
    return out
