r"""Prompt tuning (Lester et al., 2021, https://arxiv.org/abs/2104.08691).

``P`` trainable embeddings are prepended to the input embeddings; the model stays frozen::

    inputs_embeds = [ E_prompt (P x d) ; W_emb[input_ids] (L x d) ]        (B, P + L, d)

Only ``P * d`` parameters train (20 x 576 = 11,520 for SmolLM2-135M). Initialising ``E_prompt`` from the
token embeddings of a task description ("Summarize the following conversation.") instead of random
vectors makes training start closer to a useful prompt and converge faster.

The tokenizer for ``init_text`` is named in the config (``tokenizer_name_or_path``, a hub id or a local
directory, loaded with ``transformers.AutoTokenizer``), so the config stays a plain serialisable record;
left ``None`` it is the base model's own ``name_or_path``. The text is tokenized as ``peft`` does it
(``tokenizer(text)["input_ids"]``, special tokens included) and its ids repeated or cut to ``P``.
On disk the fields are ``peft``'s: ``prompt_tuning_init`` and ``prompt_tuning_init_text``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..registry import Preset, register
from .soft_prompt import InputPromptTuner, PromptLearningConfig, VirtualTokens

INIT_CHOICES = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


def to_peft_fields(data: dict[str, Any]) -> dict[str, Any]:
    """peftkit's config dict -> ``peft``'s: ``init_text`` is stored as ``prompt_tuning_init_text``."""
    data = dict(data)
    data["prompt_tuning_init_text"] = data.pop("init_text", None)
    return data


def from_peft_fields(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """``peft``'s config dict -> peftkit's (the inverse of :func:`to_peft_fields`)."""
    data = dict(data)
    if "prompt_tuning_init_text" in data:
        if data.get("init_text") is not None:
            raise ValueError(f"{source}: set init_text or prompt_tuning_init_text, not both.")
        data["init_text"] = data.pop("prompt_tuning_init_text")
    return data


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Configuration of prompt tuning (fields as in ``peft.PromptTuningConfig``, plus ``init_text``).

    Args:
        num_virtual_tokens: Number of prompt embeddings ``P`` prepended to every input.
        init_text: Text whose token embeddings initialise the prompt (e.g. "Summarize the following
            conversation."). Usually trains faster than a random start. Stored as ``prompt_tuning_init_text``.
        prompt_tuning_init: ``"RANDOM"`` (standard normal, ``peft``'s default), ``"TEXT"`` (from ``init_text``)
            or ``"SAMPLE_VOCAB"`` (embeddings of random vocabulary tokens). ``None``: ``"TEXT"`` when
            ``init_text`` is set, else ``"RANDOM"``.
        tokenizer_name_or_path: Tokenizer for ``init_text`` (hub id or local directory). ``None``: the
            base model's ``name_or_path``.
        tokenizer_kwargs: Extra arguments for ``AutoTokenizer.from_pretrained`` (``trust_remote_code`` is refused).
        num_transformer_submodules: 1 (default). ``peft`` writes 2 for encoder-decoder models, storing
            unused rows for the decoder; files with 2 load and run the same.
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    init_text: str | None = None
    prompt_tuning_init: Literal["RANDOM", "TEXT", "SAMPLE_VOCAB"] | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        init = self.prompt_tuning_init
        if init not in (None, *INIT_CHOICES):
            raise ValueError(f"PromptTuningConfig: prompt_tuning_init must be one of {INIT_CHOICES} or None, got {init!r}.")
        if self.init_text is not None:
            if not isinstance(self.init_text, str) or not self.init_text.strip():
                raise ValueError(f"PromptTuningConfig: init_text must be a non-empty string, got {self.init_text!r}.")
            if init not in (None, "TEXT"):
                raise ValueError(f"PromptTuningConfig: init_text is set but prompt_tuning_init={init!r}; use 'TEXT' (or None), or drop init_text.")
        elif init == "TEXT":
            raise ValueError("PromptTuningConfig: prompt_tuning_init='TEXT' needs init_text (the text whose embeddings start the prompt).")
        if self.tokenizer_kwargs is not None:
            if not isinstance(self.tokenizer_kwargs, dict):
                raise ValueError(f"PromptTuningConfig: tokenizer_kwargs must be a dict or None, got {self.tokenizer_kwargs!r}.")
            if self.tokenizer_kwargs.get("trust_remote_code"):
                raise ValueError("PromptTuningConfig: tokenizer_kwargs may not set trust_remote_code (it would run code from the hub).")

    @property
    def init(self) -> str:
        """The initialisation in effect."""
        return self.prompt_tuning_init or ("TEXT" if self.init_text is not None else "RANDOM")

    def to_dict(self) -> dict[str, Any]:
        data = to_peft_fields(super().to_dict())
        data["prompt_tuning_init"] = self.init
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "PromptTuningConfig":
        return super().from_dict(from_peft_fields(data, source), source=source)


class PromptTuningTuner(InputPromptTuner):
    """Attaches a :class:`PromptTuningConfig`: one trainable ``embedding`` of (P, d)."""

    def make_tokens(self) -> VirtualTokens:
        rows = self.num_rows()
        tokens = VirtualTokens(rows, self.shape.embed_dim)
        if not self.config.inference_mode and self.config.init != "RANDOM":
            with torch.no_grad():
                tokens.embedding.weight.copy_(self.word_embeddings(self._init_ids(rows)).float())
        return tokens

    def _init_ids(self, rows: int) -> torch.Tensor:
        vocab = self.word_embeddings.num_embeddings
        device = self.word_embeddings.weight.device
        if self.config.init == "SAMPLE_VOCAB":
            return torch.randint(0, vocab, (rows,), device=device)
        ids = self._tokenizer()(self.config.init_text)["input_ids"]
        if not ids:
            raise ValueError(f"PromptTuningConfig: init_text {self.config.init_text!r} tokenizes to no tokens.")
        if max(ids) >= vocab:
            raise ValueError(
                f"PromptTuningConfig: the tokenizer {self.tokenizer_name()!r} gives token id {max(ids)}, but the model's "
                f"vocabulary has {vocab} entries; use the model's own tokenizer (tokenizer_name_or_path)."
            )
        ids = (ids * math.ceil(rows / len(ids)))[:rows]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def tokenizer_name(self) -> str | None:
        config = getattr(self.model, "config", None)
        return self.config.tokenizer_name_or_path or getattr(config, "_name_or_path", None) or None

    def _tokenizer(self):
        from transformers import AutoTokenizer

        name = self.tokenizer_name()
        if not name:
            raise ValueError(
                "PromptTuningConfig: init_text needs a tokenizer, and the base model has no name_or_path to find one; "
                "set tokenizer_name_or_path (a hub id or a local directory)."
            )
        return AutoTokenizer.from_pretrained(name, **(self.config.tokenizer_kwargs or {}))

    def config_dict(self) -> dict[str, Any]:
        data = super().config_dict()
        if self.config.init == "TEXT":
            data["tokenizer_name_or_path"] = self.tokenizer_name()  # peft refuses TEXT without it
        return data


register(PromptTuningConfig, PromptTuningTuner,
         Preset("prompt_tuning", "prompt tuning: trained embeddings prepended to the input (optionally started from a text)",
                default_lr=3e-2))
