"""The prompt format an evaluation uses: the one the adapter was trained with, unless told otherwise.

``peftkit train`` records the format it resolved (layout, fields, template, chat template, truncation)
in ``run.json`` beside the adapter. Evaluation reads it back, so ``peftkit eval --adapter DIR`` builds
exactly the prompts training built. Settings given for the evaluation fill in what no run recorded
(the base model alone, or an adapter trained elsewhere); one that contradicts the recorded run is an
error unless ``--override-training-format`` says the change is meant.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from ..data import PromptFormat
from ..options import field_help

RUN_RECORD = "run.json"


def _overrides_class() -> type:
    """:class:`PromptFormat` with every field optional (``None``: not given), declared once, in PromptFormat."""
    hints, helps, defaults = typing.get_type_hints(PromptFormat), field_help(PromptFormat), PromptFormat()
    doc = ["Prompt-format settings for an evaluation; each one left unset is the training run's (its run.json), else", "",
           "    Args:"]
    for f in dataclasses.fields(PromptFormat):
        default = getattr(defaults, f.name)
        doc.append(f"        {f.name}: {helps.get(f.name, '')} Unset: as in training, else {default!r}.")
    cls = dataclasses.make_dataclass(
        "FormatOverrides", [(f.name, hints[f.name] | None, dataclasses.field(default=None)) for f in dataclasses.fields(PromptFormat)],
        namespace={"__module__": __name__},
    )
    cls.__doc__ = "\n".join(doc)
    return cls


FormatOverrides = _overrides_class()


def overrides_from(fmt: PromptFormat) -> Any:
    """The settings of ``fmt`` that differ from the defaults, as overrides (a config built in Python)."""
    defaults = PromptFormat()
    return FormatOverrides(**{f.name: getattr(fmt, f.name) for f in dataclasses.fields(PromptFormat)
                              if getattr(fmt, f.name) != getattr(defaults, f.name)})


def recorded_format(adapter: str | None, model: str | None) -> tuple[PromptFormat | None, str | None]:
    """``(format, run.json path)`` of the run that produced the adapter (or the model, for a fully
    fine-tuned one), or ``(None, None)`` when none is recorded."""
    for folder in (adapter, model):
        if not folder or not (Path(folder) / RUN_RECORD).is_file():
            continue
        path = Path(folder) / RUN_RECORD
        run = json.loads(path.read_text(encoding="utf-8"))
        stored = run.get("format") or (run.get("config") or {}).get("format")  # runs before the resolved record
        if isinstance(stored, dict):
            known = {f.name for f in dataclasses.fields(PromptFormat)}
            return PromptFormat(**{k: v for k, v in stored.items() if k in known}), str(path)
    return None, None


def eval_format(overrides: Any, adapter: str | None, model: str | None, override_training: bool = False
                ) -> tuple[PromptFormat, str]:
    """``(format, where it came from)``: the recorded training format with ``overrides`` applied."""
    given = {f.name: getattr(overrides, f.name) for f in dataclasses.fields(overrides) if getattr(overrides, f.name) is not None}
    if given.get("layout") == "auto":
        given.pop("layout")  # "recognise it" is no request to change a recorded layout
    trained, source = recorded_format(adapter, model)
    if trained is None:
        return PromptFormat(**given), "defaults" + (" and the settings given" if given else "")
    conflicts = {k: v for k, v in given.items() if v != getattr(trained, k)}
    if conflicts and not override_training:
        shown = ", ".join(f"{k}={v!r} (trained with {getattr(trained, k)!r})" for k, v in conflicts.items())
        raise ValueError(
            f"The adapter was trained with another prompt format ({source}): {shown}. Evaluating with a prompt the adapter "
            "never saw measures something else; drop these settings to use the training format, or add "
            "--override-training-format to evaluate with them anyway."
        )
    return dataclasses.replace(trained, **given), source + (" with the settings given" if conflicts else "")
