"""Command-line flags generated from config dataclasses, so ``--help`` always lists every setting with
its description (from the dataclass docstring) and its default, and a new field needs no CLI edit.

Each flag defaults to ``None`` ("not given"), so only what the user typed overrides the YAML file and
``--set`` pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from ..options import coerce, field_help, field_types


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset(), title: str | None = None,
                         choices: dict[str, list[str]] | None = None, extra_help: dict[str, str] | None = None,
                         metavars: dict[str, str] | None = None) -> list[str]:
    """Add ``--field-name`` for each field of ``cls`` (nested dataclasses get their own group); returns the dests."""
    defaults = cls()
    helps, types = field_help(cls), field_types(cls)
    group = parser.add_argument_group(title) if title else parser
    dests: list[str] = []
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(value):
            sub_title = f"{f.name.replace('_', ' ')} ({helps.get(f.name, '').rstrip('.')})"
            dests += add_config_arguments(parser, type(value), skip, sub_title, choices, extra_help, metavars)
            continue
        annotation = types[f.name]
        plain = _without_none(annotation)  # `bool | None` is still an on/off flag, a `Literal | None` still has choices
        text = helps.get(f.name, "") + (extra_help or {}).get(f.name, "")
        text = f"{text} (default: {_show(value)})".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if plain is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            options = (choices or {}).get(f.name) or (list(get_args(plain)) if get_origin(plain) is Literal else None)
            group.add_argument(flag, dest=f.name, default=None, type=_parser(annotation, f.name), choices=options,
                               metavar=(metavars or {}).get(f.name) or _metavar(plain, f.name), help=text)
        dests.append(f.name)
    return dests


def flags_from(args: argparse.Namespace, dests: list[str]) -> dict[str, Any]:
    return {d: getattr(args, d) for d in dests if getattr(args, d, None) is not None}


def add_config_file_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (any option below, by its name with "
                        "underscores, e.g. `max_steps: 200`); flags given on the command line win over it")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="override one setting, e.g. --set lr=1e-4 --set rank=16 (repeatable; wins over --config)")


def _without_none(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if get_origin(annotation) in (Union, UnionType) and len(args) == 1 else annotation


def _parser(annotation: Any, name: str):
    def parse(text: str) -> Any:
        try:
            return coerce(text, annotation, "--" + name.replace("_", "-"))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name
    return parse


def _metavar(annotation: Any, name: str) -> str | None:
    if get_origin(annotation) is Literal:
        return None
    text = str(annotation)
    if "list[int]" in text:
        return "N,N,..."
    if "list[str]" in text:
        return "NAME,NAME,..."
    if "float" in text:
        return "X"
    if "int" in text:
        return "N"
    return name.upper().split("_")[-1]


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return repr(value) if value else "required"
    return str(value)
