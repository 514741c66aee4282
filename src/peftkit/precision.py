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

from .inject import AdapterHost


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
    _linear_weights_to_bf16(model, lambda module: True)
    return model


def _linear_weights_to_bf16(model: nn.Module, chosen) -> int:
    """Store the weight of each ``nn.Linear`` for which ``chosen(module)`` holds in bf16; returns how many.
    A weight shared with the input embeddings (a tied output head) gets its own bf16 copy instead."""
    get_input = getattr(model, "get_input_embeddings", None)
    shared = get_input().weight if callable(get_input) and get_input() is not None else None
    cast = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight.dtype != torch.float32 or not chosen(module):
            continue
        if module.weight is shared:
            module.weight = nn.Parameter(shared.detach().to(torch.bfloat16), requires_grad=False)
        else:
            module.weight.data = module.weight.data.to(torch.bfloat16)
        cast += 1
    if cast:
        release_file_mappings(model)
    return cast


def release_file_mappings(model: nn.Module) -> int:
    """Copy ``model``'s CPU tensors that live in memory torch did not allocate (a checkpoint file mapped into
    memory, as transformers loads safetensors) into memory of their own; returns how many it copied.

    A mapped file stays mapped while any tensor points into it, and every page read once counts in the
    process's memory until then: after the linear weights are cast to bf16, the embeddings and norms still
    pointing into the fp32 checkpoint kept all of its pages resident (SmolLM2-135M: 513 MiB of file pages for
    108 MiB of tensors still in use). The copies hold the same values.
    """
    copied = 0
    for tensor in {id(t): t for t in (*model.parameters(), *model.buffers())}.values():
        if tensor.device.type == "cpu" and not tensor.untyped_storage().resizable():
            tensor.data = tensor.data.clone()
            copied += 1
    return copied


def store_frozen_linear_weights_in_bf16(model: nn.Module) -> int:
    """For training under bf16 autocast: store the frozen weights of ``model``'s linear layers in bf16, in place.

    Autocast casts a frozen weight to bf16 in every forward (it caches casts only for weights that require
    grad) and autograd keeps that copy for the backward pass, so a frozen fp32 weight costs its fp32 storage
    plus a bf16 copy per step. Stored in bf16, the same matmuls get the same bf16 operands (the cast is a
    deterministic rounding), so losses and gradients are unchanged while the frozen weights take half the
    memory and no per-step cast. Trainable weights and the adapters' own layers keep fp32; a base layer whose
    adapter reads the base weight itself (``AdapterLayer.reads_base_weight``, DoRA's norms) is left alone;
    an output head tied to trainable embeddings requires grad and is left alone too, one tied to frozen
    embeddings gets its own bf16 copy (the embeddings keep fp32). Returns how many weights it cast.
    """
    keep = set()  # the adapters' own layers, and base layers whose adapter reads the weight
    for host in model.modules():
        if isinstance(host, AdapterHost):
            keep.update(id(m) for m in host.adapters.modules())
            if any(adapter.reads_base_weight for adapter in host.adapters.values()):
                keep.add(id(host.base_layer))
    return _linear_weights_to_bf16(model, lambda module: not module.weight.requires_grad and id(module) not in keep)


# Decoders whose block-level norms (each block's input_layernorm and post_attention_layernorm, and the final
# norm) feed linear layers only: the attention's q/k/v (and their adapters), the MLP's gate/up, the output head.
# Not Gemma 2/3, whose post_attention_layernorm normalises the attention's output on its way into the residual
# stream, nor the per-head q/k norms of Qwen 3, whose outputs meet the fp32 rotary embeddings.
NORMS_FEEDING_LINEARS = {"llama", "mistral", "qwen2", "qwen3"}
BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm")


def norm_outputs_in_autocast_dtype(model: nn.Module) -> int:
    """Under autocast, the block-level norms of a decoder listed in :data:`NORMS_FEEDING_LINEARS` hand their
    output on in autocast's dtype (bf16), cast once; returns how many norms were hooked (0 for other models).

    An RMSNorm computes in fp32 and returns fp32, and autocast then casts that output to bf16 separately for
    each linear layer reading it: five times for q, k, v and two LoRA adapters, twice for gate and up, and in the
    backward pass each of those casts turns its bf16 gradient back into fp32 before the sum. Cast once, the
    linear layers get the same bf16 operands (the same rounding of the same values: forward and loss unchanged,
    bit for bit, unless an adapter's dropout rescales the bf16 input, which rounds once more); the backward sums
    the consumers' bf16 gradients in bf16 and converts once, so gradients agree to bf16 rounding. Outside
    autocast the hook does nothing.
    """
    from .train.loss import transformers_model

    lm = transformers_model(model)
    if getattr(getattr(lm, "config", None), "model_type", None) not in NORMS_FEEDING_LINEARS:
        return 0
    norms = [m for name, m in lm.named_modules() if name.rsplit(".", 1)[-1] in BLOCK_NORMS]
    final = getattr(getattr(lm, "model", None), "norm", None)
    norms += [final] if isinstance(final, nn.Module) else []
    for norm in norms:
        norm.register_forward_hook(_output_in_autocast_dtype)
    return len(norms)


def _output_in_autocast_dtype(module: nn.Module, args, output):
    if isinstance(output, torch.Tensor) and torch.is_autocast_enabled(output.device.type):
        return output.to(torch.get_autocast_dtype(output.device.type))
    return None
