"""Data for training and evaluation: reading files, prompts and tokens, batches.

    examples = read_examples("train.jsonl")                       # DialogSum fields by default
    encoded = encode_examples(examples, tokenizer, PromptFormat(), seq2seq=False)
    batch = collate_for_training([encoded.items[i] for i in batch_plan(...)[0]], tokenizer.pad_token_id)
"""

from .batching import BatchStream, batch_plan, collate_for_training, collate_prompts, sorted_batches
from .files import Example, read_examples, read_rows
from .prompts import DEFAULT_TEMPLATE, IGNORE_INDEX, Encoded, EncodedSet, PromptEncoder, PromptFormat, encode_examples

__all__ = [
    "BatchStream",
    "DEFAULT_TEMPLATE",
    "IGNORE_INDEX",
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
    "read_examples",
    "read_rows",
    "sorted_batches",
]


def load_encoded(
    path: str, tokenizer, fmt: PromptFormat, seq2seq: bool, limit: int | None = None, with_target: bool = True
) -> tuple[list[Example], EncodedSet]:
    """Read ``path`` and encode its rows: ``(examples, encoded)``."""
    examples = read_examples(path, fmt.input_field, fmt.target_field, require_target=with_target, limit=limit)
    return examples, encode_examples(examples, tokenizer, fmt, seq2seq, with_target=with_target)
