"""The frozen base model's linear layers computing with oneDNN-prepacked weights (CPU only).

A server never changes its base weights (adapters that would are refused), so each ``nn.Linear`` of the
base can compute with a copy of its weight reordered once into oneDNN's blocked layout, instead of
reordering it inside every matmul: on a CPU that makes a decoding step of a small model about a quarter
faster (``bench/decode_floor.py``). Adapters stay separate: a LoRA layer still computes ``base(x)``
(now packed) plus its own ``B A x`` for the rows that use it, so mixed-adapter batches are unchanged.

The original weights stay where they are (adapters such as DoRA read them), so the packed copies cost
the linear layers' memory once more. The ops are PyTorch's own (``torch.ops.mkldnn``), the ones
``torch.compile`` emits for CPU linear layers; a build without oneDNN is refused with the reason.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["prepack_linear_weights", "prepack_refusal"]

PACKABLE = (torch.float32, torch.bfloat16)


def prepack_refusal(model: nn.Module) -> str | None:
    """Why the weights of ``model`` cannot be prepacked here, or None when they can."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"prepacked weights are a CPU (oneDNN) feature; the model is on {device}"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this PyTorch build has no oneDNN (mkldnn) linear ops"
    return None


def prepack_linear_weights(model: nn.Module, rows: int) -> int:
    """Make every ``nn.Linear`` of ``model`` (a bare base model: no adapters attached yet) with a float32 or
    bfloat16 weight compute with a prepacked copy of that weight, which must not change afterwards; ``rows``
    is the usual number of rows per call (a hint for the layout). Returns the number of layers packed."""
    reason = prepack_refusal(model)
    if reason:
        raise ValueError(reason)
    packed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module) is not nn.Linear or weight.dtype not in PACKABLE:
            continue
        with torch.no_grad():
            module.forward = _packed_forward(torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=rows),
                                             module.bias, weight.dtype)
        packed += 1
    return packed


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    def forward(x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        return torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "").reshape(*x.shape[:-1], -1)

    return forward
