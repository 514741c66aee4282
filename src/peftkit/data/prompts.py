"""From examples to token ids: the prompt template, the chat template, truncation and label masking.

A causal LM sees one sequence, prompt then target, and learns only the target::

    input_ids  [ <prompt tokens ............> | <target tokens> <eos> ]
    labels     [ -100 -100 ... -100 -100 -100 | <target tokens> <eos> ]

An encoder-decoder model (T5, BART) reads the prompt in its encoder and learns the target in its
decoder (``labels`` = target tokens). Generation feeds the same prompt tokens, so what the model sees
at evaluation is exactly what it was trained on.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal

from .files import Example

DEFAULT_TEMPLATE = "Summarize the following conversation.\n\n{input}\n\nSummary:"
IGNORE_INDEX = -100  # the label value cross-entropy skips (PyTorch's default ignore_index)


@dataclass
class PromptFormat:
    """How rows become model inputs.

    Args:
        input_field: The row field holding the input text (DialogSum: ``dialogue``).
        target_field: The field holding the expected output; ``summary1``, ``summary2``, ... (same name plus a
            number) are further references that evaluation scores against.
        template: The prompt; ``{input}`` is the input field's text, and any ``{name}`` is that field of the row.
        chat_template: Wrap the prompt as a user turn with the tokenizer's chat template, when it has one
            (instruction-tuned models answer much better in the format they were tuned on).
        max_source_tokens: Longest prompt, in tokens, template included. Longer inputs are cut (see
            ``truncation_side``) and counted; raise it if many are cut, lower it to save memory and time.
        max_target_tokens: Longest target, in tokens (the end-of-sequence token included).
        truncation_side: Which end of an over-long input to drop: ``right`` (its end, keeping how it
            starts) or ``left`` (its beginning, keeping how it ends). The template is never cut.
    """

    input_field: str = "dialogue"
    target_field: str = "summary"
    template: str = DEFAULT_TEMPLATE
    chat_template: bool = True
    max_source_tokens: int = 768
    max_target_tokens: int = 128
    truncation_side: Literal["left", "right"] = "right"

    def __post_init__(self) -> None:
        if self.truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {self.truncation_side!r}.")
        for name in ("max_source_tokens", "max_target_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {value!r}.")
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as e:
            raise ValueError(f"The prompt template is not a valid format string ({e}); write literal braces as {{{{ and }}}}.") from None
        if any(not n or not n.isidentifier() for n in names):
            raise ValueError(f"The prompt template may only use named fields such as {{input}}; found {names}.")

    @property
    def template_fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]


@dataclass
class Encoded:
    """One example as token ids.

    ``input_ids``: causal LM, prompt + target (prompt only when encoded without target); encoder-decoder,
    the encoder input. ``labels``: what the loss covers (-100 elsewhere). ``prompt_length``: the number of
    leading ``input_ids`` that form the prompt (what generation is given).
    """

    input_ids: list[int]
    labels: list[int]
    prompt_length: int

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.prompt_length]

    @property
    def num_targets(self) -> int:
        """Tokens the loss is computed on (a causal LM predicts token t from the tokens before it)."""
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class EncodedSet:
    """Encoded examples plus how many of them had to be cut."""

    items: list[Encoded]
    truncated_inputs: int = 0
    truncated_targets: int = 0
    format: PromptFormat = field(default_factory=PromptFormat)

    def describe(self) -> str:
        parts = []
        if self.truncated_inputs:
            side = "end" if self.format.truncation_side == "right" else "beginning"
            parts.append(
                f"{self.truncated_inputs} of {len(self.items)} inputs were longer than max_source_tokens="
                f"{self.format.max_source_tokens} and lost their {side}"
            )
        if self.truncated_targets:
            parts.append(f"{self.truncated_targets} targets were cut to max_target_tokens={self.format.max_target_tokens}")
        return "; ".join(parts)


class PromptEncoder:
    """Turns :class:`Example` s into :class:`Encoded` token ids for one tokenizer and model kind."""

    def __init__(self, tokenizer, fmt: PromptFormat, seq2seq: bool) -> None:
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.seq2seq = seq2seq
        self.use_chat_template = fmt.chat_template and not seq2seq and bool(getattr(tokenizer, "chat_template", None))
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no end-of-sequence token; the model could not learn where a target ends.")

    def render(self, example: Example, source: str | None = None) -> str:
        """The prompt text for ``example`` (before the chat template), with ``source`` in place of its input."""
        values = {**example.fields, "input": example.source if source is None else source}
        if source is not None and self.fmt.input_field in values:
            values[self.fmt.input_field] = source
        missing = [f for f in self.fmt.template_fields if f not in values]
        if missing:
            raise ValueError(
                f"The prompt template uses {{{missing[0]}}}, but row {example.row} has no field {missing[0]!r} "
                f"(its fields: {sorted(example.fields)}; {{input}} is the --input-field text)."
            )
        return self.fmt.template.format_map(values)

    def prompt_ids(self, text: str) -> list[int]:
        tok = self.tokenizer
        if self.use_chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        ids = list(tok(text)["input_ids"])
        if not self.seq2seq and len(ids) > 1 and ids[-1] == tok.eos_token_id:
            ids = ids[:-1]  # some tokenizers end every text with EOS; a causal prompt must not
        return ids

    def encode(self, example: Example, with_target: bool = True) -> tuple[Encoded, bool, bool]:
        """``(encoded, input_was_cut, target_was_cut)``."""
        prompt, cut_input = self._fitted_prompt(example)
        if not with_target:
            return Encoded(prompt, [], len(prompt)), cut_input, False
        target, cut_target = self._target_ids(example.target, prompt_ends_with_space=self.render(example)[-1:].isspace())
        if self.seq2seq:
            return Encoded(prompt, target, len(prompt)), cut_input, cut_target
        labels = [IGNORE_INDEX] * len(prompt) + target
        return Encoded(prompt + target, labels, len(prompt)), cut_input, cut_target

    def _fitted_prompt(self, example: Example) -> tuple[list[int], bool]:
        """Prompt ids within ``max_source_tokens``, cutting the input text (never the template)."""
        limit = self.fmt.max_source_tokens
        ids = self.prompt_ids(self.render(example))
        if len(ids) <= limit:
            return ids, False
        source_ids = self.tokenizer(example.source, add_special_tokens=False)["input_ids"]
        excess = len(ids) - limit
        for margin in (0, 4, 16, 64):  # decoding and re-encoding can shift a boundary token or two
            keep = len(source_ids) - excess - margin
            if keep <= 0:
                break
            kept = source_ids[:keep] if self.fmt.truncation_side == "right" else source_ids[-keep:]
            ids = self.prompt_ids(self.render(example, source=self.tokenizer.decode(kept)))
            if len(ids) <= limit:
                return ids, True
        raise ValueError(
            f"Row {example.row}: the prompt template alone needs about {len(ids) - len(source_ids)} tokens, "
            f"more than max_source_tokens={limit}; raise max_source_tokens or shorten the template."
        )

    def _target_ids(self, target: str, prompt_ends_with_space: bool) -> tuple[list[int], bool]:
        tok, limit = self.tokenizer, self.fmt.max_target_tokens
        if self.seq2seq:
            ids = list(tok(text_target=target)["input_ids"])
            if not ids or ids[-1] != tok.eos_token_id:
                ids.append(tok.eos_token_id)
        else:
            # "Summary:" + " Tom ..." : the space belongs to the target, as in running text.
            text = target if (self.use_chat_template or prompt_ends_with_space) else " " + target
            ids = list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        if len(ids) > limit:
            return ids[: limit - 1] + [tok.eos_token_id], True
        return ids, False


def encode_examples(examples: list[Example], tokenizer, fmt: PromptFormat, seq2seq: bool, with_target: bool = True) -> EncodedSet:
    encoder = PromptEncoder(tokenizer, fmt, seq2seq)
    out = EncodedSet(items=[], format=fmt)
    for example in examples:
        encoded, cut_input, cut_target = encoder.encode(example, with_target=with_target)
        out.items.append(encoded)
        out.truncated_inputs += cut_input
        out.truncated_targets += cut_target
    return out
