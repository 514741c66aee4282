"""``AutoPeftModelFor...``: load an adapter together with the base model its config names, as ``peft`` does.

    model = AutoPeftModelForCausalLM.from_pretrained("runs/lora")   # base model + adapter, frozen

The base model is ``base_model_name_or_path`` from ``adapter_config.json``: a local directory, a hub id, or
the Hugging Face id of a catalogue model (``HuggingFaceTB/SmolLM2-135M-Instruct``), which peftkit loads from
its own offline copy. A tokenizer saved beside the adapter with more tokens than the base model's vocabulary
resizes the model's embeddings first (the adapter was trained with it), as in ``peft``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from .config import PeftConfig
from .hub import recorded_name, resolve_model
from .io.files import load_adapter_config
from .model import PeftModel

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
]


class _BaseAutoPeftModel:
    auto_class: ClassVar[str] = "AutoModel"  # the transformers Auto class that loads the base model
    task_type: ClassVar[str | None] = None  # the adapter's task_type this class loads (None: AutoPeftModel)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is used through {type(self).__name__}.from_pretrained(adapter_directory).")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """The base model named in the adapter's config (loaded with ``transformers.<auto_class>``, ``kwargs``
        passed on, e.g. ``dtype``) with the adapter in ``pretrained_model_name_or_path`` attached."""
        import transformers

        adapter_dir = Path(pretrained_model_name_or_path)
        recorded = config.to_dict() if config is not None else load_adapter_config(adapter_dir)
        task_type = recorded.get("task_type")
        if cls.task_type is None and task_type is not None:
            raise ValueError(f"{adapter_dir} holds a {task_type} adapter; load it with the AutoPeftModelFor... class of "
                             f"that task ({_class_for(task_type)}).")
        if cls.task_type is not None and task_type not in (None, cls.task_type):
            raise ValueError(f"{adapter_dir} holds a {task_type} adapter, not {cls.task_type}; use {_class_for(task_type)}.")
        base_name = recorded.get("base_model_name_or_path")
        if not base_name:
            raise ValueError(f"{adapter_dir}/adapter_config.json does not name its base model (base_model_name_or_path); "
                             "load the base model yourself and call PeftModel.from_pretrained(model, adapter_directory).")
        auto = getattr(transformers, cls.auto_class)
        base = auto.from_pretrained(resolve_model(base_name), revision=revision or recorded.get("revision"), **kwargs)
        base.config._name_or_path = recorded_name(base_name)  # a catalogue copy keeps the hub id it stands for
        if (adapter_dir / "tokenizer_config.json").is_file():
            tokenizer = transformers.AutoTokenizer.from_pretrained(adapter_dir)
            if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
                base.resize_token_embeddings(len(tokenizer))
        return PeftModel.from_pretrained(base, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable)


def _class_for(task_type: str) -> str:
    for cls in _BaseAutoPeftModel.__subclasses__():
        if cls.task_type == task_type:
            return cls.__name__
    return "PeftModel.from_pretrained(model, adapter_directory)"


class AutoPeftModel(_BaseAutoPeftModel):
    """Adapters saved without a ``task_type``: the base model through ``transformers.AutoModel``."""


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    auto_class, task_type = "AutoModelForCausalLM", "CAUSAL_LM"


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    auto_class, task_type = "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM"


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    auto_class, task_type = "AutoModelForSequenceClassification", "SEQ_CLS"


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    auto_class, task_type = "AutoModelForTokenClassification", "TOKEN_CLS"
