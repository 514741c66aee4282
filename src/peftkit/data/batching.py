"""Batches: which examples go together (grouped by length), and padding them into tensors.

Padding is dynamic: a batch is padded to its own longest example, not to a fixed maximum. Grouping
examples of similar length (within shuffled windows, so the order stays random) keeps that padding small.
"""

from __future__ import annotations

import torch

from .prompts import IGNORE_INDEX, Encoded

MEGABATCH = 64  # batches per window sorted by length; larger windows pad less but shuffle less


def batch_plan(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True) -> list[list[int]]:
    """Example indices per batch for one epoch: a shuffled order that depends only on (seed, epoch).

    With ``group_by_length``, each window of ``MEGABATCH`` batches is sorted by length (longest first),
    cut into batches, and the batches are shuffled, except that the one holding the longest example
    goes first, so a batch that does not fit in memory fails at step one rather than hours later.
    The last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * MEGABATCH
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    longest = max(range(len(shuffled)), key=lambda b: max(lengths[i] for i in shuffled[b]))
    shuffled.insert(0, shuffled.pop(longest))
    return shuffled


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: examples sorted by length (longest first), so each batch pads little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate_for_training(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` (B, T) and ``labels`` (B, T) for a causal LM,
    or (B, T_target) for an encoder-decoder model; padding is -100 in the labels."""
    longest = max(len(e.input_ids) for e in items)
    longest_labels = max(len(e.labels) for e in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    labels = torch.full((len(items), longest_labels), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(items):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[row, : len(e.input_ids)] = 1
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(items: list[Encoded], pad_id: int, padding_side: str) -> dict[str, torch.Tensor]:
    """Prompts only, for generation: (B, T). A causal LM needs ``left`` padding, so every row's last
    prompt token sits in the last column and new tokens follow it directly."""
    longest = max(e.prompt_length for e in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, e in enumerate(items):
        n = e.prompt_length
        cols = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        input_ids[row, cols] = torch.tensor(e.prompt_ids)
        attention_mask[row, cols] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class BatchStream:
    """The run's batches, epoch after epoch, addressed by position (batch ``k`` of the whole run), so a
    resumed run continues with exactly the batch an uninterrupted run would have taken next.

    ``min_rows``: a last batch with fewer rows is dropped (each micro-batch of each process needs a row).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True, min_rows: int = 1):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.group_by_length, self.min_rows = group_by_length, min_rows
        self._epoch, self._plan = -1, []
        self.batches_per_epoch = len(self._plan_for(0))
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(lengths)} examples are too few for one batch across {min_rows} processes.")

    def _plan_for(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            plan = batch_plan(self.lengths, self.batch_size, self.seed, epoch, self.group_by_length)
            self._epoch, self._plan = epoch, [b for b in plan if len(b) >= self.min_rows]
        return self._plan

    def batch(self, position: int) -> list[int]:
        epoch, index = divmod(position, self.batches_per_epoch)
        return self._plan_for(epoch)[index]
