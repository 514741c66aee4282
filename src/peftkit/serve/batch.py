"""The running batch's KV cache and the token sampler: pure tensor functions the engine calls.

Rows are right-aligned: every row's newest token sits in the last column, and columns a row has
not used yet are left padding (mask 0)::

    column:   0 1 2 3 4 5 6
    row 0:    . . p p p g g      p prompt, g generated, . padding (attention mask 0)
    row 1:    p p p p p p g

One decoding step therefore appends one column for every row. Each row's ``position_ids`` count
only its own tokens, so rotary embeddings see the positions the request would have alone, and the
cached keys of a row never move relative to each other when rows join or leave.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (B, L) with L the longest prompt, padded on the left."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, length - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token within its own row (B, L): 0 at the first real token; padding gets 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def layers_of(cache: DynamicCache) -> list:
    """The layers of ``cache`` that hold keys."""
    return [layer for layer in cache.layers if layer.keys is not None and layer.keys.numel()]


def merge(cache: DynamicCache, mask: torch.Tensor, new_cache: DynamicCache, new_mask: torch.Tensor) -> torch.Tensor:
    """Append the rows of ``new_cache`` (B2, heads, T2, dim) below those of ``cache`` (B1, heads, T1, dim),
    in place, padding the shorter of the two on the left. Returns the merged mask (B1 + B2, max(T1, T2))."""
    length = max(mask.shape[1], new_mask.shape[1])
    for old, new in zip(layers_of(cache), layers_of(new_cache), strict=True):
        old.keys = torch.cat([_pad_left(old.keys, length, dim=2), _pad_left(new.keys, length, dim=2)])
        old.values = torch.cat([_pad_left(old.values, length, dim=2), _pad_left(new.values, length, dim=2)])
    return torch.cat([_pad_left(mask, length, dim=1), _pad_left(new_mask, length, dim=1)])


def select(cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only rows ``keep`` (in that order), in place, then drop the leading columns that became
    padding in every remaining row. Returns the new mask."""
    index = torch.tensor(keep, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in layers_of(cache):
        layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, start:]
        layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, start:]
    return mask[:, start:]


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]  # F.pad lists dimensions from the last one
    return F.pad(t, pad)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from ``logits`` (V,): greedy when ``temperature`` is 0, else nucleus sampling
    (the smallest set of tokens whose probability reaches ``top_p``) at that temperature."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float()
    # Shifted so the largest is 0: a small temperature then sends the others towards -inf (probability 0)
    # instead of overflowing to inf - inf = NaN. Softmax is unchanged by the shift.
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the first token always stays
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
