"""Which arithmetic precision a run uses, and why: bf16 where the hardware runs it fast.

Training uses bf16 autocast: matrix multiplications run in bfloat16 while weights, optimizer states
and the loss stay fp32. Generation uses autocast too, over bf16 copies of the linear layers' weights
(see :func:`cast_linear_weights_to_bf16`). On CPUs with AMX (Intel Sapphire Rapids and later) a bf16 matmul is ~9x faster than fp32;
on Ampere and newer GPUs bf16 runs on tensor cores.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """``(fast bf16 available, the reason in words)``."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"GPU {torch.cuda.get_device_name(device)} {'supports' if ok else 'does not support'} bf16"
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        if amx:
            return True, "CPU has AMX bf16 matrix units"
        if avx512_bf16:
            return True, "CPU has AVX512-BF16 instructions"
        return False, "CPU has neither AMX nor AVX512-BF16 (bf16 would be slower than fp32)"
    return False, f"bf16 autocast is not enabled by default on {device.type}"


def resolve_precision(choice: str, device: torch.device) -> tuple[bool, str]:
    """``(use_bf16, reason)`` for ``precision`` = ``auto`` | ``bf16`` | ``fp32``."""
    if choice == "fp32":
        return False, "fp32 requested"
    supported, reason = bf16_support(device)
    if choice == "bf16":
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"precision=bf16 is not available on {device.type}; use --precision fp32.")
        return True, f"bf16 requested ({reason})"
    return supported, f"auto: {reason}"


def autocast(device: torch.device, use_bf16: bool) -> contextlib.AbstractContextManager:
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def cast_linear_weights_to_bf16(model: nn.Module) -> nn.Module:
    """Store the weights of ``model``'s linear layers in bf16, in place, for inference under autocast.

    Autocast would cast them to bf16 in every call anyway (for every generated token): it caches a cast only
    for weights that require grad, which frozen base weights do not. Storing them so gives the same
    arithmetic without that cost, and halves their memory. Embeddings and norms stay fp32, so the residual
    stream keeps autocast's fp32 precision (casting the whole model to bf16 is faster still but changes more
    predictions and lowers ROUGE). An output head tied to the input embeddings gets its own bf16 copy of the
    shared weight (the embeddings keep the fp32 one): casting 49k x 576 floats at every decoding step
    would otherwise cost as much as the rest of a step.
    """
    get_input = getattr(model, "get_input_embeddings", None)
    shared = get_input().weight if callable(get_input) and get_input() is not None else None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if module.weight is shared:
                module.weight = nn.Parameter(shared.detach().to(torch.bfloat16), requires_grad=False)
            else:
                module.weight.data = module.weight.data.to(torch.bfloat16)
    return model
