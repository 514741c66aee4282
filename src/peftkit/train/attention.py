"""Attention for bf16 training on a CPU: bf16 flash-attention forward, its backward computed in fp32.

PyTorch's CPU flash-attention kernel (what SDPA runs) is fast forward in bf16 but slow backward in bf16: on a
Sapphire Rapids core, 4 x 9 heads x 256 x 64 took 3.7 ms forward and 44.7 ms backward in bf16, against 6.4 ms
and 21.7 ms in fp32 (torch 2.13, best of 15). A decoder layer's attention backward was then a sixth of a LoRA
step. This runs the bf16 forward, keeps what SDPA keeps (q, k, v, the output in bf16 and the fp32 row
log-sum-exp), and computes the gradients with the fp32 backward kernel on fp32 copies of them, cast back to
bf16 for the rest of the backward pass. The gradients are the exact gradients of the bf16 forward's softmax,
computed in fp32 instead of bf16 (closer to an fp32 reference, tested in tests/test_fast_paths.py).

:func:`cpu_bf16_training_attention` switches a transformers model to it for the duration of a ``with``
block; anything it does not cover (decoding with a cache, dropout, fp32, other devices, no gradients)
goes to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["cpu_bf16_training_attention"]

NAME = "peftkit_cpu_bf16_training"


class _FlashForwardFp32Backward(torch.autograd.Function):
    """``scaled_dot_product_attention`` without dropout: forward by the CPU flash kernel in the inputs' dtype,
    backward by the same kernel in fp32. q: (B, H, S, D); k, v: (B, H / groups, S, D), each k/v head serving
    ``groups`` consecutive query heads (grouped-query attention), kept at that size for the backward."""

    @staticmethod
    def forward(ctx, query, key, value, mask, is_causal: bool, scale, groups: int = 1):
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), 0.0, is_causal,
            attn_mask=mask, scale=scale)
        ctx.save_for_backward(query, key, value, out, logsumexp, mask)
        ctx.is_causal, ctx.scale, ctx.groups = is_causal, scale, groups
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, logsumexp, mask = ctx.saved_tensors
        g = ctx.groups
        f32 = [grad_out.float(), query.float(), key.float().repeat_interleave(g, dim=1),
               value.float().repeat_interleave(g, dim=1), out.float()]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *f32, logsumexp, 0.0, ctx.is_causal, attn_mask=None if mask is None else mask.float(), scale=ctx.scale)
        if g > 1:  # each k/v head's gradient: the sum over the query heads it served
            dk, dv = (d.unflatten(1, (-1, g)).sum(2) for d in (dk, dv))
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), None, None, None, None


def _attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function contract: (B, H, S, D) in, ((B, S, H, D), None) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # Under autocast, q and k arrive in fp32 (rotary embeddings multiply them by fp32 cos/sin) and SDPA casts
    # them to bf16, an autocast op: do the same.
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    covered = (query.device.type == "cpu" and dtype == torch.bfloat16 and torch.is_grad_enabled() and dropout == 0.0
               and query.shape[2] > 1 and key.shape[2] == query.shape[2] and kwargs.get("softcap") is None
               and kwargs.get("position_bias") is None and not kwargs.get("output_attentions", False)
               and (attention_mask is None or attention_mask.dim() == 4))
    if not covered:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: k/v heads repeated inside, not saved so
    causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:  # the kernel takes an additive mask
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    out = _FlashForwardFp32Backward.apply(query, key, value, mask, bool(causal), scaling, groups)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as SDPA


@contextlib.contextmanager
def cpu_bf16_training_attention(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within the block, ``model``'s SDPA attention runs :class:`_FlashForwardFp32Backward` where it applies
    (bf16 on a CPU with gradients); yields whether it was switched on. Only a model whose config says
    ``sdpa`` is switched (eager or flash-attention models are left as they are), and its setting is restored
    on exit, so nothing is saved with it."""
    configs = [m.config for m in model.modules() if getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"]
    if not enabled or not configs:
        yield False
        return
    _register()
    for config in configs:
        config._attn_implementation = NAME
    try:
        yield True
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"
