"""Which layout a data file's rows follow, and each row as an :class:`Example`.

=================  ====================================================================  =========================
layout             a row                                                                 learns
=================  ====================================================================  =========================
fields             ``--input-field`` and ``--target-field`` (DialogSum: dialogue, summary)  the target field
messages           ``{"messages": [{"role": "system"|"user"|"assistant", "content": ..}]}``  the assistant turns
prompt_completion  ``{"prompt": .., "completion": ..}``                                  the completion
instruction        ``{"instruction": .., "input": .. (optional), "output": ..}``          the output
=================  ====================================================================  =========================

``layout: auto`` (the default) recognises the layout from the first row and says which it found, so a
chat file works without naming fields. Targets that are numbers or booleans (``"label": 1``) are learned
as text when they look like class labels (a few distinct integers or booleans), and refused otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .files import Example, _json_kind, _text, read_rows
from .prompts import DEFAULT_TEMPLATE, PromptFormat

# layout -> (the fields that identify it, what a row holds, for messages)
LAYOUT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "output"),
}
ROLES = ("system", "user", "assistant")
MAX_LABELS = 20  # more distinct integer targets than this (or than half the rows) are answers, not class labels


def load_examples(path: str, fmt: PromptFormat, require_target: bool = True, limit: int | None = None
                  ) -> tuple[list[Example], PromptFormat, list[str]]:
    """Rows of ``path`` as examples: ``(examples, format with its layout resolved, notes for the user)``."""
    rows = read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    fmt, note = resolve_layout(rows[0], fmt, path)
    notes = [note]
    if fmt.layout == "messages":
        return [_chat_example(row, i, path, require_target) for i, row in enumerate(rows, start=1)], fmt, notes
    label_note = targets_as_text(rows, fmt.target_field, path)
    if label_note:
        notes.append(label_note)
    if fmt.layout == "instruction":
        rows = [_instruction_row(row, i, path) for i, row in enumerate(rows, start=1)]
    return _field_examples(rows, path, fmt.input_field, fmt.target_field, require_target), fmt, notes


def read_examples(path: str, input_field: str = "dialogue", target_field: str = "summary", require_target: bool = True,
                  limit: int | None = None) -> list[Example]:
    """Rows of ``path`` as :class:`Example` s, read from ``input_field`` and ``target_field``.

    References are ``row[target_field]`` and, after it, ``row[target_field + "1"]``, ``+ "2"``, ...
    (DialogSum's test split has ``summary1..summary3``). With ``require_target=False`` rows without
    any reference are kept (generation only).
    """
    fmt = PromptFormat(layout="fields", input_field=input_field, target_field=target_field)
    return load_examples(path, fmt, require_target, limit)[0]


def resolve_layout(row: dict[str, Any], fmt: PromptFormat, path: str) -> tuple[PromptFormat, str]:
    """``fmt`` with ``layout`` (and the fields and template it implies) filled in, and a line saying what was found."""
    layout = fmt.layout
    if layout == "auto":
        layout = _detect(row, fmt, path)
    custom_template = fmt.template not in (DEFAULT_TEMPLATE, "{input}", "")
    if layout == "messages":
        if custom_template:
            raise ValueError(f"{path}: chat messages take no prompt template (the chat template lays the turns out); "
                             "remove --template, or use prompt/completion rows.")
        fmt = dataclasses.replace(fmt, layout=layout, input_field="messages", target_field="messages", template="")
        learns = "every assistant turn" if fmt.assistant_turns == "all" else "the last assistant turn only"
        return fmt, (f"{path}: chat messages (field 'messages'); the loss covers {learns} "
                     f"(--assistant-turns {'last' if fmt.assistant_turns == 'all' else 'all'} to change)")
    if layout in ("prompt_completion", "instruction"):
        input_field, target_field = ("prompt", "completion") if layout == "prompt_completion" else ("instruction", "output")
        template = fmt.template if custom_template else "{input}"
        fmt = dataclasses.replace(fmt, layout=layout, input_field=input_field, target_field=target_field, template=template)
        shown = "prompt -> completion" if layout == "prompt_completion" else "instruction (+ input) -> output"
        return fmt, f"{path}: {layout.replace('_', '/')} rows ({shown})"
    return dataclasses.replace(fmt, layout="fields"), f"{path}: fields {fmt.input_field!r} -> {fmt.target_field!r}"


def _detect(row: dict[str, Any], fmt: PromptFormat, path: str) -> str:
    named = (fmt.input_field, fmt.target_field) != ("dialogue", "summary")
    if named or fmt.input_field in row:
        return "fields"  # the fields the user named (or DialogSum's): their own errors say what is missing
    for layout, needed in LAYOUT_FIELDS.items():
        if all(name in row for name in needed):
            return layout
    known = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in LAYOUT_FIELDS.items())
    raise ValueError(
        f"{path}: row 1 matches no layout peftkit knows; its fields are {sorted(row)}. Known layouts, by the fields "
        f"they need: {known}; fields: the fields you name with --input-field and --target-field (by default DialogSum's "
        "dialogue and summary). Rename the fields, or set --input-field and --target-field."
    )


def targets_as_text(rows: list[dict[str, Any]], target_field: str, path: str) -> str | None:
    """Turn integer/boolean class labels in the target field(s) into text, in place; refuse other non-text targets.

    Returns a line saying what was converted (None when every target was already text)."""
    names = [target_field] + [f"{target_field}{i}" for i in range(1, 100) if any(f"{target_field}{i}" in r for r in rows)]
    found = [(number, row[name]) for number, row in enumerate(rows, start=1) for name in names
             if name in row and not isinstance(row[name], str)]
    if not found:
        return None
    numbers = [(number, v) for number, v in found if isinstance(v, (int, bool))]
    values = {json.dumps(v) for _, v in numbers}
    other = [(number, v) for number, v in found if not isinstance(v, (int, bool))]
    if other:
        number, value = other[0]
        if value is None:
            return None  # reported as a missing target, with its row, when the rows are read
        raise ValueError(
            f"{path}: row {number}, field {target_field!r} is a {_json_kind(value)} ({value!r}); peftkit trains the model to "
            "write text. Store the target as text in the file (\"0.5\", not 0.5), or choose a text field with --target-field."
        )
    if len(found) < sum(name in r for r in rows for name in names) and values:
        number, value = numbers[0]
        raise ValueError(f"{path}: field {target_field!r} mixes text and numbers (row {number}: {value!r}); store every "
                         "target as text, or every one as a class label (number or true/false).")
    if len(values) > max(2, min(MAX_LABELS, len(rows) // 2)):
        number, value = numbers[0]
        raise ValueError(
            f"{path}: field {target_field!r} holds numbers ({len(values)} different values in {len(rows)} rows, e.g. row "
            f"{number}: {value!r}): too many to be class labels, and peftkit trains the model to write text. If the numbers "
            "are answers to generate, store them as text in the file (\"42\", not 42)."
        )
    for row in rows:
        for name in names:
            if isinstance(row.get(name), (int, bool)):
                row[name] = json.dumps(row[name])  # 1 -> "1", true -> "true"
    return f"{path}: field {target_field!r} holds class labels {sorted(values)}; learned and scored as the text labels"


def _field_examples(rows: list[dict[str, Any]], path: str, input_field: str, target_field: str, require_target: bool
                    ) -> list[Example]:
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


def _instruction_row(row: dict[str, Any], number: int, path: str) -> dict[str, Any]:
    """The Alpaca layout: the instruction, then its input (when there is one) after a blank line, as the prompt."""
    instruction = _text(row, "instruction", path, number, "--input-field")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"{path}: row {number}, field 'input' is a {_json_kind(extra)}, expected text.")
    return {**row, "instruction": f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction}


def _chat_example(row: dict[str, Any], number: int, path: str, require_target: bool) -> Example:
    turns = row.get("messages")
    where = f"{path}: row {number}"
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of turns ({{\"role\": ..., \"content\": ...}}).")
    for k, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}, turn {k}: each turn needs a 'role' ({', '.join(ROLES)}) and a text 'content'; "
                             f"found {turn!r}.")
    roles = [t["role"] for t in turns]
    spoken = [r for r in roles if r != "system"]
    if not spoken or spoken[0] != "user":
        raise ValueError(f"{where}: the first turn after any system turns must be a user turn; the roles are {roles}.")
    if "assistant" not in roles:
        if require_target:
            raise ValueError(f"{where} has no assistant turn: nothing to learn or score against. Its roles are {roles}.")
        return Example(source=turns[-1]["content"], references=[], row=number, fields=row, messages=[dict(t) for t in turns])
    last = len(roles) - 1 - roles[::-1].index("assistant")
    if last != len(roles) - 1:
        raise ValueError(f"{where}: turn {last + 2} ({roles[last + 1]}) comes after the last assistant turn and has no "
                         f"answer to learn; end each row with an assistant turn (roles: {roles}).")
    answer = turns[last]["content"]
    if not answer.strip():
        raise ValueError(f"{where}: the last assistant turn is empty.")
    question = next(t["content"] for t in reversed(turns) if t["role"] == "user")
    return Example(source=question, references=[answer], row=number, fields=row,
                   messages=[{"role": t["role"], "content": t["content"]} for t in turns])
