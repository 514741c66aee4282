"""The running batch's KV cache, two ways: ``"dynamic"`` (transformers' ``DynamicCache``, grown by
concatenation) and ``"static"`` (preallocated slots written in place).

Both hold the keys and values of every running row and answer the engine's three questions: add the
rows a prefill produced (:meth:`join`), let finished rows go (:meth:`keep`), and give the cache and
attention mask for one decoding step of every row (:meth:`step`).

``dynamic`` (:mod:`peftkit.serve.batch`'s right-aligned layout): each step appends one column to
every layer with ``torch.cat``, which copies the whole cache; a row joining or leaving copies it again.

``static``: one preallocated buffer per layer, (slots, kv heads, columns, head dim); row i of the
batch lives in slot i with its tokens left-aligned, at columns ``0 .. length_i - 1``::

    column:   0 1 2 3 4 5 6 7        p prompt, g generated, 0 zeros (never written or cleared)
    slot 0:   p p p g g 0 0 0        a step writes each row's new key at its own column (its length)
    slot 1:   p p p p p p g 0        and attends to columns 0 .. its length (mask); the step's keys
    slot 2:   (free)                 are a view of columns 0 .. longest row, nothing is copied

A step writes one key and value per row in place. A joining row copies its prompt's keys once; a
leaving row's slot is filled by the last row's (one row copied, not the batch). The buffers grow by
doubling when a row or column is needed beyond them and are kept for the next requests, so memory
follows the largest batch served, not ``max_batch_size x max_model_len``. Columns beyond what a slot
holds are zeros (a new occupant clears what its predecessor wrote), so masked columns add exactly 0
to attention whatever the previous request computed.

The static cache serves models whose every layer attends to the whole past (``full_attention``);
:func:`static_refusal` says why another model keeps the dynamic cache.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from . import batch

__all__ = ["KV_CACHES", "DynamicRunningCache", "StaticRunningCache", "running_cache", "static_refusal"]

KV_CACHES = ("static", "dynamic")
KvCache = Literal["static", "dynamic"]


class DynamicRunningCache:
    """The batch's cache as transformers' ``DynamicCache`` in :mod:`peftkit.serve.batch`'s layout."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, columns), 1 = real token

    def join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append the rows of a prefill (``cache`` and its left-padded ``mask``, (B, L)) below the running ones."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            self.mask = batch.merge(self.cache, self.mask, cache, mask)

    def keep(self, keep: list[int]) -> list[int]:
        """Keep rows ``keep`` (in that order); returns them, the old indices in their new order."""
        if keep:
            self.mask = batch.select(self.cache, self.mask, keep)
        else:
            self.cache, self.mask = None, None
        return keep

    def step(self) -> tuple[DynamicCache, torch.Tensor]:
        """``(cache, attention mask)`` for a step that feeds one token per row; the cache grows by that column."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self.cache, self.mask


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values, (slots, kv heads, columns, head dim). ``update`` writes the step's
    key of row i at column ``lengths[i]`` and returns columns ``0 .. width - 1`` of the running rows."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True
        self.rows: torch.Tensor | None = None  # (n,) the running slots
        self.lengths: torch.Tensor | None = None  # (n,) where each row's new key goes
        self.width = 0

    def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover - created full
        raise AssertionError("slot layers are allocated by StaticRunningCache")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states (n, heads, 1, dim): one new token per row
        self.keys[self.rows, :, self.lengths] = key_states[:, :, 0]
        self.values[self.rows, :, self.lengths] = value_states[:, :, 0]
        n = len(self.rows)
        return self.keys[:n, :, : self.width], self.values[:n, :, : self.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.width, 0

    def get_seq_length(self) -> int:
        # The step's query sits at the last column: the causal part of the mask then allows every column
        # and the padding mask alone says which ones each row attends to.
        return self.width - 1

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class _SlotCache(Cache):
    def __init__(self, layers: list[_SlotLayer]) -> None:
        super().__init__(layers=layers)


class StaticRunningCache:
    """The batch's cache in preallocated slots (see the module docstring). ``rows x columns`` start at the
    first prefill's size and double when outgrown."""

    def __init__(self) -> None:
        self.layers: list[_SlotLayer] = []
        self.lengths: list[int] = []  # tokens cached per running row (row i in slot i)
        self.written: list[int] = []  # per slot: columns at and beyond it are zero

    def join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Copy the rows of a prefill (left-padded ``mask`` (B, L), ``cache`` layers (B, heads, L, dim)) into
        the next free slots, each row's tokens moved to column 0."""
        prompt_lengths = mask.sum(dim=1).tolist()
        source = batch.layers_of(cache)
        first = len(self.lengths)
        self._reserve(first + len(prompt_lengths), max(prompt_lengths) + 1, source)
        width = mask.shape[1]
        for j, p in enumerate(prompt_lengths):
            slot = first + j
            for layer, new in zip(self.layers, source, strict=True):
                layer.keys[slot, :, :p] = new.keys[j, :, width - p:]
                layer.values[slot, :, :p] = new.values[j, :, width - p:]
                if self.written[slot] > p:  # what the slot's previous occupant left
                    layer.keys[slot, :, p: self.written[slot]] = 0
                    layer.values[slot, :, p: self.written[slot]] = 0
            self.written[slot] = p
            self.lengths.append(p)

    def keep(self, keep: list[int]) -> list[int]:
        """Keep rows ``keep``; each slot left empty below the new row count takes the row of a slot above it
        (one row copied per hole). Returns the old row indices in their new order."""
        n = len(keep)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in range(n, len(self.lengths)) if i in kept]
        order = list(range(n))
        for hole, mover in zip(holes, movers, strict=True):
            used = max(self.written[hole], self.written[mover])  # both are zeros beyond their own mark
            for layer in self.layers:
                layer.keys[hole, :, :used] = layer.keys[mover, :, :used]
                layer.values[hole, :, :used] = layer.values[mover, :, :used]
            self.written[hole] = self.written[mover]
            order[hole] = mover
        self.lengths = [self.lengths[i] for i in order]
        return order

    def step(self) -> tuple[Cache, torch.Tensor]:
        """``(cache, attention mask (n, width))`` for a step feeding one token per row: row i's token is
        written at column ``lengths[i]`` and attends to columns ``0 .. lengths[i]``."""
        n, width = len(self.lengths), max(self.lengths) + 1
        self._reserve(n, width)
        device = self.layers[0].keys.device
        lengths = torch.tensor(self.lengths, device=device)
        rows = torch.arange(n, device=device)
        for layer in self.layers:
            layer.rows, layer.lengths, layer.width = rows, lengths, width
        mask = (torch.arange(width, device=device) <= lengths[:, None]).long()
        for i, length in enumerate(self.lengths):
            self.written[i] = max(self.written[i], length + 1)
        self.lengths = [length + 1 for length in self.lengths]
        return _SlotCache(self.layers), mask

    def _reserve(self, rows: int, columns: int, like: list | None = None) -> None:
        """Make room for ``rows`` slots of ``columns`` columns, doubling what is too small (new room is zeros)."""
        if not self.layers:
            self.layers = [_SlotLayer(_zeros(layer.keys, rows, columns), _zeros(layer.values, rows, columns))
                           for layer in like]
            self.written = [0] * rows
            return
        have_rows, have_columns = self.layers[0].keys.shape[0], self.layers[0].keys.shape[2]
        if rows <= have_rows and columns <= have_columns:
            return
        new_rows = max(rows, 2 * have_rows) if rows > have_rows else have_rows
        new_columns = max(columns, 2 * have_columns) if columns > have_columns else have_columns
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                grown = _zeros(old, new_rows, new_columns)
                grown[:have_rows, :, :have_columns] = old
                setattr(layer, name, grown)
        self.written += [0] * (new_rows - have_rows)


def _zeros(like: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    return like.new_zeros((rows, like.shape[1], columns, like.shape[3]))


def static_refusal(config) -> str | None:
    """Why the static cache cannot serve a model with this config, or None when it can."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        others = sorted(set(layer_types) - {"full_attention"})
        if others:
            return f"its layers include {', '.join(others)} (the static cache serves full-attention layers only)"
    elif getattr(config, "sliding_window", None) is not None:
        return "it attends through a sliding window (the static cache serves full-attention layers only)"
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder"
    return None


def running_cache(kind: KvCache) -> DynamicRunningCache | StaticRunningCache:
    if kind not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {kind!r}.")
    return StaticRunningCache() if kind == "static" else DynamicRunningCache()
