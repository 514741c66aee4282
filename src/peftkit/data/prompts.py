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
LAYOUTS = ("auto", "fields", "messages", "prompt_completion", "instruction")
IGNORE_INDEX = -100  # the label value cross-entropy skips (PyTorch's default ignore_index)
# For chat messages when the model has no chat template (or --no-chat-template): one "Role: text" paragraph a turn.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass
class PromptFormat:
    """How rows become model inputs.

    Args:
        layout: What a row holds: ``fields`` (the input and target fields below, with the prompt template),
            ``messages`` (chat turns: a list of ``{"role": "system"|"user"|"assistant", "content": ...}``),
            ``prompt_completion`` (``prompt`` and ``completion``) or ``instruction`` (``instruction``, an
            optional ``input``, ``output``); ``auto`` recognises it from the first row's fields.
        assistant_turns: In ``messages`` rows, which assistant turns the loss covers: ``all`` of them, or only
            the ``last`` (earlier answers are then context only). Evaluation always answers the last turn.
        input_field: The row field holding the input text (DialogSum: ``dialogue``).
        target_field: The field holding the expected output; ``summary1``, ``summary2``, ... (same name plus a
            number) are further references that evaluation scores against.
        template: The prompt; ``{input}`` is the input field's text, and any ``{name}`` is that field of the row
            (``prompt_completion`` and ``instruction`` rows use ``{input}`` alone unless you set one; chat
            ``messages`` take none: the chat template lays the turns out).
        chat_template: Wrap the prompt as a user turn with the tokenizer's chat template, when it has one
            (instruction-tuned models answer much better in the format they were tuned on); ``messages``
            rows use it for every turn (without one: plain ``User: ...`` / ``Assistant: ...`` lines).
        max_source_tokens: Longest prompt, in tokens, template included. Longer inputs are cut (see
            ``truncation_side``) and counted; raise it if many are cut, lower it to save memory and time.
        max_target_tokens: Longest target, in tokens (the end-of-sequence token included).
        truncation_side: Which end of an over-long input to drop: ``right`` (its end, keeping how it
            starts) or ``left`` (its beginning, keeping how it ends). The template is never cut. A
            ``messages`` row too long for ``max_source_tokens`` loses its oldest exchanges instead.
    """

    layout: Literal["auto", "fields", "messages", "prompt_completion", "instruction"] = "auto"
    assistant_turns: Literal["all", "last"] = "all"
    input_field: str = "dialogue"
    target_field: str = "summary"
    template: str = DEFAULT_TEMPLATE
    chat_template: bool = True
    max_source_tokens: int = 768
    max_target_tokens: int = 128
    truncation_side: Literal["left", "right"] = "right"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}.")
        if self.assistant_turns not in ("all", "last"):
            raise ValueError(f"assistant_turns must be 'all' or 'last', got {self.assistant_turns!r}.")
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
    notes: list[str] = field(default_factory=list)  # which layout was recognised, labels turned into text
    chat_template_used: bool = False  # the tokenizer's own chat template shaped the prompts (it has one, and chat_template)

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
        if example.messages is not None:
            return self._encode_chat(example, with_target)
        prompt, cut_input = self._fitted_prompt(example)
        if not with_target:
            return Encoded(prompt, [], len(prompt)), cut_input, False
        target, cut_target = self._target_ids(example.target, prompt_ends_with_space=self.render(example)[-1:].isspace())
        if self.seq2seq:
            return Encoded(prompt, target, len(prompt)), cut_input, cut_target
        labels = [IGNORE_INDEX] * len(prompt) + target
        return Encoded(prompt + target, labels, len(prompt)), cut_input, cut_target

    # --- chat messages ------------------------------------------------------------------------------
    def _encode_chat(self, example: Example, with_target: bool) -> tuple[Encoded, bool, bool]:
        """A conversation: the turns before the answer are the prompt (assistant turns in it are learned too
        with ``assistant_turns="all"``); the answer, the last assistant turn, is the target. Every
        assistant turn's span runs from after the template's assistant header through its end-of-turn marker.
        """
        if self.seq2seq:
            raise ValueError("Chat messages need a decoder-only (causal) model: an encoder-decoder model has a single "
                             "target per row. Use prompt/completion rows instead.")
        turns = example.messages
        has_answer = bool(turns) and turns[-1]["role"] == "assistant"
        context = turns[:-1] if has_answer else turns
        context, segments, cut_input = self._fitted_context(example, context)
        prompt = [t for ids, _ in segments for t in ids]
        if not (with_target and has_answer):
            return Encoded(prompt, [], len(prompt)), cut_input, False
        learned = self.fmt.assistant_turns == "all"
        labels = [t if (learned and is_answer) else IGNORE_INDEX for ids, is_answer in segments for t in ids]
        before, full = self._render(context, True), self._render(context + turns[-1:], False)
        if not full.startswith(before):
            raise ValueError(self._not_prefix_message(example))
        answer = self._tokens(full[len(before):])
        if self.tokenizer.eos_token_id not in answer:
            answer.append(self.tokenizer.eos_token_id)  # the template ends no turn: the model must still learn to stop
        cut_target = len(answer) > self.fmt.max_target_tokens
        if cut_target:
            answer = answer[: self.fmt.max_target_tokens - 1] + [self.tokenizer.eos_token_id]
        return Encoded(prompt + answer, labels + answer, len(prompt)), cut_input, cut_target

    def _fitted_context(self, example: Example, context: list[dict[str, str]]):
        """``(turns kept, their segments, whether turns were dropped)``: the prompt within ``max_source_tokens``, dropping the oldest exchanges (after any
        system turns) while it is too long; a single exchange that does not fit is an error."""
        cut = False
        while True:
            segments = self._chat_segments(example, context)
            length = sum(len(ids) for ids, _ in segments)
            if length <= self.fmt.max_source_tokens:
                return context, segments, cut
            first = next(i for i, t in enumerate(context) if t["role"] != "system")
            later_user = [i for i, t in enumerate(context) if i > first and t["role"] == "user"]
            if not later_user:
                raise ValueError(
                    f"Row {example.row}: its last user turn (with any system turns and the chat template) needs {length} "
                    f"tokens, more than max_source_tokens={self.fmt.max_source_tokens}; raise max_source_tokens."
                )
            context, cut = context[:first] + context[later_user[0]:], True

    def _chat_segments(self, example: Example, context: list[dict[str, str]]) -> list[tuple[list[int], bool]]:
        """``context`` rendered with the generation prompt, as ``(token ids, is an assistant turn)`` segments.
        Each segment is tokenized on its own, so training and generation see the same prompt tokens."""
        text = self._render(context, True)
        segments, position = [], 0
        for i, turn in enumerate(context):
            if turn["role"] != "assistant":
                continue
            start, end = self._render(context[:i], True), self._render(context[: i + 1], False)
            if not (end.startswith(start) and text.startswith(end)):
                raise ValueError(self._not_prefix_message(example))
            segments += [(self._tokens(text[position : len(start)]), False), (self._tokens(end[len(start):]), True)]
            position = len(end)
        segments.append((self._tokens(text[position:]), False))
        return [(ids, is_answer) for ids, is_answer in segments if ids]

    def _render(self, turns: list[dict[str, str]], generation_prompt: bool) -> str:
        template = None if self.use_chat_template else PLAIN_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _not_prefix_message(self, example: Example) -> str:
        return (f"Row {example.row}: this tokenizer's chat template does not render a conversation as the rendering of "
                "its earlier turns plus the new ones (it rewrites earlier turns), so the assistant turns cannot be "
                "located exactly; set --no-chat-template to use plain 'User:'/'Assistant:' lines.")

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
    out.chat_template_used = encoder.use_chat_template
    for example in examples:
        encoded, cut_input, cut_target = encoder.encode(example, with_target=with_target)
        out.items.append(encoded)
        out.truncated_inputs += cut_input
        out.truncated_targets += cut_target
    return out
