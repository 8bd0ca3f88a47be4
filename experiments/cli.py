"""Command lines generated from a study's settings dataclass.

Each field of the dataclass is one ``--kebab-case`` option whose type comes from the field's
annotation (``int``, ``float``, ``str``, ``bool``, ``Optional[...]`` accepting ``none``,
``Tuple[X, ...]`` as one or more values) and whose help, choices and other argparse extras come
from the field's metadata (:func:`option`). A field holding a dataclass (a group of settings)
becomes one option per inner field, named with the outer field's name as prefix. Options left
off the command line keep the chosen preset's value (``--tiny``, ``--quick``, the default, or
``--full``).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import fields, is_dataclass, replace
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

PRESET_NAMES = ("tiny", "quick", "full")
#: words that mean "no value" for an ``Optional`` field (``inf`` too for a float: no bound)
NONE_WORDS = ("none", "off")

#: metadata keys that are not argparse keywords
_OWN_KEYS = ("help", "cli", "check")


def option(default: Any = dataclasses.MISSING, help: str = "", *, cli: bool = True,
           check: Optional[Callable[[Any], Any]] = None, **argparse_extras) -> Any:
    """A settings field with its command-line description.

    ``help``: the option's help text; ``cli=False``: no option; ``check``: called with the
    resolved value (raises ``SystemExit`` with a clear message when it is invalid); any other
    keyword (``choices``, ``nargs``, ``metavar``) goes to ``argparse`` as it is.
    """
    metadata = {"help": help, "cli": cli, "check": check, **argparse_extras}
    return dataclasses.field(default=default, metadata=metadata)


# ---------------------------------------------------------------- presets
def add_preset_arguments(parser: argparse.ArgumentParser, full_time: str) -> None:
    """``--tiny`` (seconds), ``--quick`` (the default) and ``--full`` (``full_time``: how long)."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="smoke test (seconds)")
    mode.add_argument("--quick", action="store_true", help="the default: a few minutes on 2 cores")
    mode.add_argument("--full", action="store_true", help=f"the README's tables ({full_time})")


def preset_name(args: argparse.Namespace) -> str:
    """The preset chosen on the command line (``quick`` unless ``--tiny`` or ``--full``)."""
    return next((name for name in ("tiny", "full") if getattr(args, name, False)), "quick")


# ------------------------------------------------------------ field types
def parse_optional(kind: type) -> Callable[[str], Any]:
    """``argparse`` type for an ``Optional[kind]``: ``none`` / ``off`` (and ``inf`` for a float) is ``None``."""
    words = NONE_WORDS + (("inf",) if kind is float else ())

    def parse(text: str):
        return None if text.lower() in words else kind(text)

    parse.__name__ = f"optional {kind.__name__}"
    return parse


def argparse_keywords(hint: Any) -> Dict[str, Any]:
    """The ``type`` / ``nargs`` / ``action`` keywords for a field annotated ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"nargs": "+", **argparse_keywords(args[0])}
    if origin is typing.Union and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return {"type": parse_optional(inner)}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint in (int, float, str):
        return {"type": hint}
    raise TypeError(f"no command-line type for a settings field of type {hint!r}")


def _settings_fields(cls: type, preset: Any = None,
                     prefix: str = "") -> Iterator[Tuple[str, dataclasses.Field, Any, Any]]:
    """``(dest, field, annotation, value in preset)`` of every command-line field of ``cls``
    (groups flattened; the value is ``MISSING`` without a preset)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        value = dataclasses.MISSING if preset is None else getattr(preset, f.name)
        if is_dataclass(hints[f.name]):
            yield from _settings_fields(hints[f.name], None if preset is None else value, f"{prefix}{f.name}_")
        else:
            yield prefix + f.name, f, hints[f.name], value


def _shown(value: Any) -> str:
    """A preset value as the command line writes it."""
    if isinstance(value, tuple):
        return " ".join(_shown(v) for v in value) or "none"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------ the options
def add_settings_arguments(parser: argparse.ArgumentParser, cls: type, preset: Any = None) -> None:
    """One option per command-line field of the settings dataclass ``cls``; with a ``preset``
    (the default one), each help ends with its value there. Unset options are absent from the
    parsed namespace, so an explicit ``none`` is told apart from "not given"."""
    for dest, f, hint, value in _settings_fields(cls, preset):
        extras = {k: v for k, v in f.metadata.items() if k not in _OWN_KEYS}
        keywords = {**argparse_keywords(hint), **extras}
        choices = f"; one of {', '.join(map(str, keywords['choices']))}" if "choices" in keywords else ""
        shown = "" if value is dataclasses.MISSING else f" [default: {_shown(value)}]"
        text = f.metadata.get("help", "") + choices + shown
        if choices:
            keywords.setdefault("metavar", dest.upper())
        parser.add_argument("--" + dest.replace("_", "-"), dest=dest, default=argparse.SUPPRESS,
                            help=text.replace("%", "%%"), **keywords)


def resolve(preset: Any, args: argparse.Namespace, prefix: str = "") -> Any:
    """``preset`` with every option given on the command line (lists become tuples); then
    each field's ``check`` runs on its value."""
    changes = {}
    for f in fields(preset):
        dest, value = prefix + f.name, getattr(preset, f.name)
        if is_dataclass(value) and f.metadata.get("cli", True):
            changes[f.name] = resolve(value, args, dest + "_")
        elif hasattr(args, dest) and f.metadata.get("cli", True):
            given = getattr(args, dest)
            changes[f.name] = tuple(given) if isinstance(given, list) else given
    settings = replace(preset, **changes)
    for f in fields(settings):
        if f.metadata.get("check"):
            f.metadata["check"](getattr(settings, f.name))
    return settings
