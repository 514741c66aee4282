"""Data for training and evaluation: reading files, prompts and tokens, batches.

    examples, fmt, notes = load_examples("train.jsonl", PromptFormat())  # the layout recognised from the fields
    encoded = encode_examples(examples, tokenizer, fmt, seq2seq=False)
    batch = collate_for_training([encoded.items[i] for i in batch_plan(...)[0]], tokenizer.pad_token_id)
"""

from .batching import BatchStream, batch_plan, collate_for_training, collate_prompts, sorted_batches
from .files import Example, read_rows
from .layouts import load_examples, read_examples
from .prompts import DEFAULT_TEMPLATE, IGNORE_INDEX, LAYOUTS, Encoded, EncodedSet, PromptEncoder, PromptFormat, encode_examples

__all__ = [
    "BatchStream",
    "DEFAULT_TEMPLATE",
    "IGNORE_INDEX",
    "LAYOUTS",
    "Encoded",
    "EncodedSet",
    "Example",
    "PromptEncoder",
    "PromptFormat",
    "batch_plan",
    "collate_for_training",
    "collate_prompts",
    "encode_examples",
    "load_encoded",
    "load_examples",
    "read_examples",
    "read_rows",
    "sorted_batches",
]


def load_encoded(
    path: str, tokenizer, fmt: PromptFormat, seq2seq: bool, limit: int | None = None, with_target: bool = True
) -> tuple[list[Example], EncodedSet]:
    """Read ``path`` and encode its rows: ``(examples, encoded)``; ``encoded.format`` has the layout resolved
    and ``encoded.notes`` say what was recognised."""
    examples, resolved, notes = load_examples(path, fmt, require_target=with_target, limit=limit)
    encoded = encode_examples(examples, tokenizer, resolved, seq2seq, with_target=with_target)
    encoded.notes = notes
    return examples, encoded
