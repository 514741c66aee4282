"""The fields every adapter config shares, and reading/writing them as ``adapter_config.json``.

Each method defines its own dataclass (``LoraConfig``, ``IA3Config``, ...) that subclasses
:class:`PeftConfig`, validates itself in ``__post_init__`` and sets the class variable ``peft_type``
to the name the Hugging Face PEFT format uses (``"LORA"``, ``"IA3"``, ...). Field names follow the
``peft`` package so a file moves between the two without renaming.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from typing import Any, ClassVar


class TaskType(str, enum.Enum):
    """What the model is used for; ``peft``'s names and values (``TaskType.CAUSAL_LM == "CAUSAL_LM"``)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


TASK_TYPES: tuple[str, ...] = tuple(t.value for t in TaskType)

# Keys that ``peft`` writes into adapter_config.json but that change nothing for peftkit when they
# hold these values (bookkeeping, or options of features that are switched off).
INERT_PEFT_KEYS: dict[str, Any] = {
    "peft_version": None,
    "auto_mapping": None,
    "megatron_core": "megatron.core",
    "qalora_group_size": None,
    "runtime_config": None,
    "loftq_config": {},
}


@dataclass
class PeftConfig:
    """Fields shared by every method's config.

    Args:
        task_type: What the model is used for (``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``, ...). ``None`` lets
            :func:`peftkit.get_peft_model` infer it from the model; soft-prompt methods need it.
        base_model_name_or_path: The model the adapter was trained on; written to the file so a reader
            knows which base to load. Filled in from the model when ``None``.
        revision: Revision of the base model on the hub, if any.
        inference_mode: ``True`` when the adapter was loaded for inference (its parameters frozen).
    """

    peft_type: ClassVar[str] = ""

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value  # the same name as a plain string, as the file stores it
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type={self.task_type!r} is not one of {list(TASK_TYPES)} (or None to infer it).")

    # --- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as ``adapter_config.json`` stores it (``peft_type`` included, sets as sorted lists)."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, frozenset)):
                value = sorted(value)
            out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "PeftConfig":
        """Build the config from a dict, refusing options it cannot honour instead of dropping them.

        Keys that ``peft`` writes for features peftkit does not have are accepted only while they hold
        their "off" value (None, False, empty, or the value in :data:`INERT_PEFT_KEYS`).
        """
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ValueError(f"{source}: peft_type is {peft_type!r}, expected {cls.peft_type!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, unsupported = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in INERT_PEFT_KEYS and (INERT_PEFT_KEYS[key] is None or value == INERT_PEFT_KEYS[key]):
                continue
            elif value in (None, False, {}, [], ""):
                continue
            else:
                unsupported.append(f"{key}={value!r}")
        if unsupported:
            raise ValueError(
                f"{source}: peftkit's {cls.__name__} does not support {', '.join(unsupported)}. "
                "Remove these options (or set them to their default) to load this adapter with peftkit."
            )
        return cls(**kwargs)
