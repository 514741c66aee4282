"""The language-modelling loss, computed either the plain way or only at target positions.

The plain way: the model projects every position's hidden state onto the whole vocabulary (B x T x V
logits; V = 49,152 for SmolLM2) and the loss then ignores the prompt positions. For summarization the
prompt is most of the sequence, so most of that projection, and of its backward pass, is thrown away.

:class:`TargetOnlyHead` hooks the model so that the output head runs only on the hidden states whose
next token is a target (N x V logits, N = number of target tokens), and the loop computes the same
cross-entropy from them. It reads the labels the model is finally called with, so it also works when a
soft-prompt method prepends virtual tokens (and -100 labels) inside ``PeftModel.forward``, and for
encoder-decoder models (whose decoder inputs it builds from the labels, as the model itself would).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from ..model import PeftModel


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel and/or DistributedDataParallel (or the model itself)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return inner.get_base_model() if isinstance(inner, PeftModel) else inner


class TargetOnlyHead:
    """While installed, ``model(**batch)`` with ``labels`` returns logits (N, V) for the N target tokens
    only (in row-major order), and :attr:`targets` (N,) holds the token each row must predict.

    Use as a context manager; calls without ``labels`` (generation, evaluation) are left untouched.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = hf_model(model)
        self.seq2seq = bool(getattr(self.model.config, "is_encoder_decoder", False))
        head = self.model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(self.model).__name__} has no output head; target_only_logits needs a language model.")
        self.head = head
        self.keep: torch.Tensor | None = None  # (B, T) bool: positions whose output is needed
        self.targets: torch.Tensor | None = None  # (N,)
        self._handles: list[Any] = []

    def __enter__(self) -> "TargetOnlyHead":
        self._handles = [
            self.model.register_forward_pre_hook(self._take_labels, with_kwargs=True),
            self.head.register_forward_pre_hook(self._select_rows),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.keep, self.targets = [], None, None

    def _take_labels(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        labels = kwargs.pop("labels", None)
        if labels is None:
            self.keep = self.targets = None
            return None
        if self.seq2seq:
            if kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
                kwargs["decoder_input_ids"] = module.prepare_decoder_input_ids_from_labels(labels=labels)
            keep = labels != IGNORE_INDEX  # decoder position t predicts labels[t]
            self.targets = labels[keep]
        else:
            # Position t predicts token t+1: keep t where labels[t+1] is set; the last position predicts nothing.
            shifted = labels[:, 1:]
            keep = F.pad(shifted != IGNORE_INDEX, (0, 1), value=False)
            self.targets = shifted[shifted != IGNORE_INDEX]
        self.keep = keep
        return args, kwargs

    def _select_rows(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.keep is None:
            return None
        hidden = args[0]  # (B, T, H)
        if hidden.shape[:2] != self.keep.shape:
            raise RuntimeError(
                f"target_only_logits: the output head got hidden states of shape {tuple(hidden.shape)} but the labels "
                f"have shape {tuple(self.keep.shape)}; run with target_only_logits=false for this model."
            )
        return (hidden[self.keep],) + args[1:]  # (N, H)


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], head: TargetOnlyHead | None) -> tuple[torch.Tensor, int]:
    """``(sum of the token cross-entropies, number of target tokens)`` of one batch.

    The sum (not the mean) lets the loop divide by the number of target tokens of the whole optimizer
    step, over all micro-batches and processes, so gradient accumulation and DDP give the same update
    as one big batch.
    """
    if head is not None:
        logits = model(**batch).logits  # (N, V)
        targets = head.targets
        return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.numel())
    out = model(**batch)  # the model's own loss: mean over its target tokens
    labels = batch["labels"]
    n = int((labels != IGNORE_INDEX).sum() if getattr(hf_model(model).config, "is_encoder_decoder", False) else (labels[:, 1:] != IGNORE_INDEX).sum())
    return out.loss.float() * n, n
