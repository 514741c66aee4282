"""The language-modelling loss of one batch, computed at the target positions only or the plain way.

The plain way: the model projects every position's hidden state onto the whole vocabulary (B x T x V
logits; V = 49,152 for SmolLM2) and the loss then ignores the prompt positions. For summarization the
prompt is most of the sequence, so most of that projection, and of its backward pass, is thrown away.

Target-only: the model is asked for the logits of the N positions whose next token is a target, and for
nothing else (transformers' ``logits_to_keep`` with a (B, T) mask: the body runs as usual, the output
head only on the N hidden states), then the same cross-entropy is taken over those N rows::

    labels        (B, T)   -100 on the prompt and the padding
    keep          (B, T)   position t is kept when labels[t + 1] is a target
    logits        (N, V)   model(..., logits_to_keep=keep).logits, rows in the order of hidden[keep]
    targets       (N,)     labels[:, 1:][labels[:, 1:] != -100], the same order

A soft prompt's virtual tokens, prepended inside ``PeftModel.forward``, get ``False`` there too.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn

from ..data import IGNORE_INDEX
from ..model import PeftModel


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], target_only: bool = True) -> tuple[torch.Tensor, int]:
    """``(sum of the token cross-entropies, number of target tokens)`` of one batch.

    ``batch``: ``input_ids`` and ``attention_mask`` (B, T) and ``labels`` ((B, T) for a causal LM, (B, T_target)
    for an encoder-decoder model; -100 where nothing is learned). ``model``: a PeftModel (or a transformers
    model), possibly wrapped for several processes (DDP); called through the wrapper, so gradients synchronise.

    The sum, not the mean, lets the loop divide by the number of target tokens of the whole optimizer step,
    over all micro-batches and processes, so gradient accumulation and DDP give the same update as one big
    batch. ``target_only`` is a speed-up with the same result; models that cannot take a ``logits_to_keep``
    mask (encoder-decoder models, whose decoder reads the target only, so nearly every position is one)
    take the plain path.
    """
    labels = batch["labels"]
    lm = transformers_model(model)
    if takes_use_cache(type(lm)):
        # No key/value cache: nothing decodes after this forward (a prefix's own cache still goes in), and building
        # one would make compiled blocks recompile for every layer (each writes its keys at its own index).
        batch = {**batch, "use_cache": False}
    if target_only and keeps_logits_by_mask(type(lm)) and not lm.config.is_encoder_decoder:
        next_labels = labels[:, 1:]  # position t predicts token t + 1
        keep = F.pad(next_labels != IGNORE_INDEX, (0, 1), value=False)  # (B, T); the last position predicts nothing
        targets = next_labels[next_labels != IGNORE_INDEX]  # (N,)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, logits_to_keep=keep).logits  # (N, V): the output head ran on these N positions only
        return F.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel()
    out = model(**batch)  # the model's own loss: the mean over its target tokens, from (B, T, V) logits
    predicted = labels if lm.config.is_encoder_decoder else labels[:, 1:]  # decoder position t predicts labels[t]
    n = int((predicted != IGNORE_INDEX).sum())
    return out.loss.float() * n, n


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel and/or a multi-process wrapper (or the model itself)."""
    inner = extract_model_from_parallel(model)
    return inner.get_base_model() if isinstance(inner, PeftModel) else inner


@functools.cache
def takes_use_cache(model_class: type) -> bool:
    return "use_cache" in inspect.signature(model_class.forward).parameters


@functools.cache
def keeps_logits_by_mask(model_class: type) -> bool:
    """Whether ``model_class.forward`` takes a (B, T) boolean ``logits_to_keep`` mask. Its parameter
    alone does not say so: older models, and every model of transformers releases before the mask, slice
    positions with it (``hidden[:, logits_to_keep]``). Models that take the mask slice through transformers'
    ``slice_logits_to_keep``, which their module imports; it is tried once on a (1, 2) mask."""
    if "logits_to_keep" not in inspect.signature(model_class.forward).parameters:
        return False
    slice_positions = getattr(sys.modules.get(model_class.__module__), "slice_logits_to_keep", None)
    try:
        return slice_positions is not None and slice_positions(torch.zeros(1, 2, 1), torch.tensor([[True, False]])).shape == (1, 1)
    except (IndexError, RuntimeError, TypeError):
        return False
