"""Filling typed dataclass configs from YAML files, ``--set key=value`` and command-line flags.

A config is a dataclass whose fields are plain values or nested dataclasses (``TrainConfig.format``
is a :class:`~peftkit.data.PromptFormat`). Keys may name a nested field directly (``max_source_tokens``)
or by its path (``format.max_source_tokens``); a method's options (``r``, ``lora.r``, ``method_options.r``)
are kept for the method's own config class to read. Every value is converted to the
field's annotated type, and a wrong key or value is an error that says what is accepted: nothing is
silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null", "~", ""}


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def locate(config: Any, key: str) -> tuple[Any, str]:
    """``(dataclass instance, field name)`` that ``key`` names inside ``config`` (flat or dotted)."""
    if "." in key:
        head, rest = key.split(".", 1)
        inner = section(config, head)
        if inner is None:
            raise ValueError(f"Unknown setting {key!r}: {head!r} is not a section of {type(config).__name__}.")
        return locate(inner, rest)
    found = _find(config, key)
    if found is None:
        raise ValueError(f"Unknown setting {key!r}; known settings: {', '.join(sorted(set(known_keys(config))))}.")
    return found


def _find(config: Any, key: str) -> tuple[Any, str] | None:
    """The field ``key`` of ``config`` itself, else of its sections (nested dataclasses), searched in order."""
    names = {f.name for f in dataclasses.fields(config)}
    if key in names and not dataclasses.is_dataclass(getattr(config, key)):
        return config, key
    for f in dataclasses.fields(config):
        inner = getattr(config, f.name)
        if dataclasses.is_dataclass(inner) and (found := _find(inner, key)) is not None:
            return found
    return None


def section(config: Any, name: str) -> Any:
    """The nested dataclass ``name`` of ``config``, or of one of its sections (a comparison's ``format`` is
    ``training.format``); None if there is none."""
    inner = getattr(config, name, None)
    if dataclasses.is_dataclass(inner):
        return inner
    for f in dataclasses.fields(config):
        outer = getattr(config, f.name)
        if dataclasses.is_dataclass(outer) and dataclasses.is_dataclass(getattr(outer, name, None)):
            return getattr(outer, name)
    return None


def _section_holder(config: Any, name: str) -> Any:
    """The (nested) dataclass that has the section ``name`` as a field, searched in order; None if none does."""
    if dataclasses.is_dataclass(getattr(config, name, None)):
        return config
    for f in dataclasses.fields(config):
        inner = getattr(config, f.name)
        if dataclasses.is_dataclass(inner) and (holder := _section_holder(inner, name)) is not None:
            return holder
    return None


def known_keys(config: Any) -> list[str]:
    keys = []
    for f in dataclasses.fields(config):
        inner = getattr(config, f.name)
        keys += known_keys(inner) if dataclasses.is_dataclass(inner) else [f.name]
    return keys


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (a YAML value or command-line text) as ``annotation``; ValueError naming ``key`` if it cannot be."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        errors = []
        for option in _union_order(args, value):
            try:
                return coerce(value, option, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{key}: {value!r} is not a valid value ({'; '.join(errors)}).")
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"{key} must be one of {', '.join(map(str, args))}, got {value!r}.")
    if annotation is Any:
        return value
    if origin is dict:
        key_type, value_type = args or (str, Any)
        mapping = value
        if isinstance(value, str):  # command-line text: a YAML/JSON mapping, e.g. "{q_proj: 16}"
            try:
                mapping = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError:
                mapping = None
        if not isinstance(mapping, dict):
            raise ValueError(f"{key} must be a mapping such as {{name: value}}, got {value!r}.")
        return {coerce(k, key_type, key): coerce(v, value_type, f"{key}.{k}") for k, v in mapping.items()}
    if origin is list:
        (item,) = args
        items = value if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",") if v.strip()]
        return [coerce(v, item, key) for v in items]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{key} must be true or false, got {value!r}.")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            number = float(str(value))
        except ValueError:
            raise ValueError(f"{key} must be an integer, got {value!r}.") from None
        if not number.is_integer():
            raise ValueError(f"{key} must be an integer, got {value!r}.")
        return int(number)
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))  # YAML reads 2e-4 (no dot) as text
        except ValueError:
            raise ValueError(f"{key} must be a number, got {value!r}.") from None
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key} must be text, got {value!r}.")
    raise TypeError(f"{key}: cannot read values of type {annotation!r}")  # a programming error, not a user one


def _union_order(args: tuple, value: Any) -> list[Any]:
    """Try the most specific member first: ``list[str] | str`` reads "q_proj,v_proj" as a list but
    "all-linear" or a regex as text."""
    options = [a for a in args if a is not type(None)]
    if isinstance(value, str) and any(get_origin(a) is list for a in options):
        is_list = "," in value or re.fullmatch(r"[\w-]+", value) is not None and value != "all-linear"
        options.sort(key=lambda a: (get_origin(a) is list) != is_list)
    return options


def set_value(config: Any, key: str, value: Any) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a whole section, from Python code
        holder = _section_holder(config, key)
        if holder is None or not isinstance(value, type(getattr(holder, key))):
            raise ValueError(f"Unknown section {key!r} for a {type(value).__name__} value.")
        setattr(holder, key, value)
        return
    target, name = locate(config, key)
    setattr(target, name, coerce(value, field_types(type(target))[name], key))


def setting_changes(before: dict[str, Any], now: dict[str, Any], ignore: set[str] = frozenset()) -> list[str]:
    """``["format.max_source_tokens: 768 -> 300", ...]``: the (nested) settings that differ between two
    ``dataclasses.asdict`` dicts, except those whose last name is in ``ignore``."""
    a, b = _flat_dict(before), _flat_dict(now)
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if k.split(".")[-1] not in ignore and a.get(k) != b.get(k)]


def _flat_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def read_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings (key: value), found a {type(data).__name__}.")
    return data


def _flatten(config: Any, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"format": {"max_source_tokens": 300}}`` -> ``{"format.max_source_tokens": 300}`` for sections
    (nested dataclasses) of ``config``; other values are kept as they are."""
    out = {}
    for key, value in data.items():
        inner = section(config, str(key))
        if isinstance(value, dict) and inner is not None:
            out.update(_flatten(inner, value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_sets(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: write --set key=value (for example --set lr=1e-4).")
        out[key.strip()] = value
    return out


def revalidate(config: Any) -> Any:
    """Run every (nested) dataclass's ``__post_init__`` validation again after fields were set."""
    for f in dataclasses.fields(config):
        inner = getattr(config, f.name)
        if dataclasses.is_dataclass(inner):
            revalidate(inner)
    post_init = getattr(config, "__post_init__", None)
    if post_init is not None:
        post_init()
    return config


def build(cls: type, yaml_path: str | None = None, sets: list[str] | None = None, *,
          file_values: dict[str, Any] | None = None, **flags: Any) -> Any:
    """``cls()`` defaults, then the YAML file, then ``--set`` pairs, then explicit flags (later wins); validated.
    ``file_values`` stands in for a YAML file that the caller has already read (and perhaps reshaped)."""
    config = cls()
    if file_values is None and yaml_path:
        file_values = read_yaml(yaml_path)
    from_file = _flatten(config, file_values or {})
    layers = [from_file, parse_sets(sets), {k: v for k, v in flags.items() if v is not None}]
    method_options: dict[str, tuple[str | None, Any]] = {}
    for layer in layers:
        for key, value in layer.items():
            if not _method_option(config, key, value, method_options):
                set_value(config, key, value)
    if method_options:
        _set_method_options(config, method_options)
    return revalidate(config)


# --- method options: the settings of the method's own config class (LoraConfig.r, IA3Config.target_modules, ...)
# A config with a ``method_options`` dict (TrainConfig, the comparisons) takes them as ``method_options.KEY``,
# ``METHOD.KEY`` (``lora.r``; in YAML also a ``lora:`` mapping) or plain ``KEY`` (``r``, ``target_modules``).
# They stay raw here: the method's preset converts and checks them (registry.Preset.read) when the config
# validates, since only the method knows its options' types.

def _method_option(config: Any, key: str, value: Any, out: dict[str, tuple[str | None, Any]]) -> bool:
    """Collect ``key`` into ``out`` if it names a method option of ``config``; False if it is an ordinary setting."""
    if "method_options" not in {f.name for f in dataclasses.fields(config)}:
        return False
    from .registry import option_names, presets

    head, dot, rest = key.partition(".")
    if key == "method_options" or (not dot and key in presets() and isinstance(value, dict)):
        if not isinstance(value, dict):
            raise ValueError(f"method_options must be a mapping of option: value (e.g. {{r: 16}}), got {value!r}.")
        section = None if key == "method_options" else key
        out.update({str(k): (section, v) for k, v in value.items()})
        return True
    if dot and (head == "method_options" or head in presets()) and "." not in rest:
        out[rest] = (None if head == "method_options" else head, value)
        return True
    if not dot and key not in known_keys(config) and key in option_names():
        out[key] = (None, value)
        return True
    return False


def _set_method_options(config: Any, collected: dict[str, tuple[str | None, Any]]) -> None:
    method = getattr(config, "method", None)
    for key, (section, _) in collected.items():
        if section is None or section == method:
            continue
        if method is None:
            raise ValueError(f"{section}.{key}: settings of one method go in per_method ({section}.{key}=...); "
                             f"plain {key}=... sets it for every method that takes it.")
        raise ValueError(f"{section}.{key} is a setting of method {section!r}, but the method is {method!r}: "
                         f"write {method}.{key} (or {key}), or choose --method {section}.")
    config.method_options = {**config.method_options, **{key: value for key, (_, value) in collected.items()}}


def field_help(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Args:`` sections of a dataclass's docstring and of its base
    classes' (a subclass documents only the fields it adds or redefines)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object and klass.__doc__:
            out.update(_args_section(klass.__doc__))
    return out


def _args_section(doc: str) -> dict[str, str]:
    out: dict[str, str] = {}
    lines = doc.splitlines()
    inside, name, indent = False, None, 0
    for line in lines:
        if line.strip() == "Args:":
            inside, indent = True, len(line) - len(line.lstrip())
            continue
        if not inside:
            continue
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break  # end of the Args section
        match = re.match(r"\s+(\w+):\s*(.*)", line)
        if match and (len(line) - len(line.lstrip())) <= indent + 4:
            name = match.group(1)
            out[name] = match.group(2).strip()
        elif name and line.strip():
            out[name] += " " + line.strip()
    return out
