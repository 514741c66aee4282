r"""A quantized, frozen base model under trainable adapters (QLoRA: Dettmers et al., 2023,
https://arxiv.org/abs/2305.14314; LLM.int8(): Dettmers et al., 2022, https://arxiv.org/abs/2208.07339).

``--quantize nf4|fp4|int8`` loads the base model through transformers' ``BitsAndBytesConfig``: every
linear layer but the output head becomes a bitsandbytes ``Linear4bit`` (4-bit NormalFloat or 4-bit
float, blocks of 64 weights with one scale each, the scales themselves quantized to 8 bits: "double
quantization", ~4.13 bits per weight) or ``Linear8bitLt`` (int8 rows with one scale each, ~8 bits).
Matrix products run in the compute dtype (bf16 as in the QLoRA paper, for 4-bit) on weights dequantized
block by block; nothing about the base trains. Adapters wrap these layers like any ``nn.Linear``::

    h = Q(W) x + (alpha / r) B A x          Q(W): the frozen 4/8-bit weight, run by bitsandbytes

so the adapter file is an ordinary PEFT adapter. Merging needs a weight in which ``B A`` can be added
without rounding it away: :func:`dequantize_model` turns every quantized layer back into an ``nn.Linear``
(fp32 by default), ``merge_and_unload`` merges there, and :func:`requantize_model` quantizes again on
request. bitsandbytes is an optional dependency (``pip install 'peftkit[quantize]'``); it runs on x86-64
CPUs and on CUDA GPUs.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

QuantizeKind = Literal["none", "nf4", "fp4", "int8"]
KINDS: tuple[str, ...] = ("nf4", "fp4", "int8")

# On CPUs with AVX512-BF16, bitsandbytes tries to download a faster 4-bit kernel from the Hugging Face hub at import
# and logs a warning when it cannot (always, offline); the 8-bit matmul logs that it casts inputs to fp16 on every
# call (that cast is how LLM.int8() works). Neither says anything a user can act on.
for _name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def require_bitsandbytes():
    """The ``bitsandbytes`` module, or an ImportError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(
            "--quantize needs bitsandbytes (4-bit and 8-bit layers for x86-64 CPUs and CUDA GPUs): "
            "pip install 'peftkit[quantize]'  (or: pip install bitsandbytes)"
        ) from None
    return bitsandbytes


def quantization_config(kind: str, compute_dtype: torch.dtype = torch.bfloat16):
    """transformers' ``BitsAndBytesConfig`` for ``kind``: ``nf4``/``fp4`` with double quantization and
    ``compute_dtype`` matmuls (the QLoRA paper's setting), or ``int8`` (LLM.int8() with its default
    outlier threshold 6.0: input columns holding larger values run in 16-bit)."""
    from transformers import BitsAndBytesConfig

    if kind not in KINDS:
        raise ValueError(f"quantize must be one of {', '.join(KINDS)} (or none), got {kind!r}.")
    require_bitsandbytes()
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (subclasses of ``nn.Linear`` whose ``weight`` holds packed
    integers). Decided by class, without importing bitsandbytes for models that never used it."""
    return type(module).__module__.startswith("bitsandbytes") and isinstance(module, nn.Linear)


def quantized_kind(model: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"``, ``"int8"`` for a model loaded with a bitsandbytes config, else None."""
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    if q is None:
        return None
    q = q.to_dict() if hasattr(q, "to_dict") else dict(q)
    if q.get("quant_method") != "bitsandbytes":
        return None
    if q.get("load_in_8bit"):
        return "int8"
    return q.get("bnb_4bit_quant_type", "fp4") if q.get("load_in_4bit") else None


def keep_training_layout(model: nn.Module) -> int:
    """Keep every 4-bit layer of ``model`` in bitsandbytes' standard layout; returns how many layers it set.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 rewrites a 4-bit weight, in place, into the layout of a fused
    inference kernel at its first forward in eval mode without gradients. After that a training forward fails
    ("a view of a leaf Variable that requires grad is being used in an in-place operation") and the weight no
    longer dequantizes with the ordinary call (DoRA's norms, merging). An adapted model evaluates during training
    and may train again after, so peftkit turns that rewrite off for the models it wraps (and undoes it where it
    already happened). The cost: CPU inference on a 4-bit base runs the unfused kernels."""
    count = 0
    for module in model.modules():
        if is_quantized_linear(module) and hasattr(module, "support_avx512bf16_for_cpu"):
            _standard_layout(module)
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _standard_layout(module: nn.Module) -> None:
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight of ``module`` as ordinary floats, (out_features, in_features): dequantized for a bitsandbytes
    layer (fp32), the weight itself otherwise. DoRA's row norms and merging read this."""
    if not is_quantized_linear(module):
        return module.weight
    bnb = require_bitsandbytes()
    weight = module.weight
    if hasattr(weight, "quant_state"):  # Params4bit
        _standard_layout(module)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scale = getattr(weight, "SCB", None)  # Int8Params: int8 rows (CB) times SCB / 127
    scale = module.state.SCB if scale is None else scale
    return bnb.functional.int8_vectorwise_dequant(weight.data, scale).float()


def _parents_of_quantized(model: nn.Module):
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if is_quantized_linear(child):
                yield parent, name, child


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every bitsandbytes layer of ``model`` (also those inside adapter hosts) by an ``nn.Linear`` holding
    its dequantized weight in ``dtype``, in place. Returns how many were replaced. What each layer did
    (``quant_type``, compute dtype, ...) is recorded on the new module as ``_quantized_from`` for
    :func:`requantize_model`."""
    count = 0
    for parent, name, child in list(_parents_of_quantized(model)):
        weight = dequantized_weight(child)
        linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device=weight.device, dtype=dtype)
        linear.weight.data.copy_(weight)
        if child.bias is not None:
            linear.bias.data.copy_(child.bias.data)
        linear.requires_grad_(False)
        linear._quantized_from = _layer_settings(child)
        setattr(parent, name, linear)
        count += 1
    return count


def _layer_settings(module: nn.Module) -> dict:
    weight = module.weight
    if hasattr(weight, "quant_state"):
        return {"bits": 4, "quant_type": weight.quant_type, "compress_statistics": weight.compress_statistics,
                "blocksize": weight.blocksize, "compute_dtype": module.compute_dtype, "quant_storage": weight.quant_storage}
    return {"bits": 8, "threshold": module.state.threshold}


@torch.no_grad()
def requantize_model(model: nn.Module) -> int:
    """Quantize again, in place, every ``nn.Linear`` that :func:`dequantize_model` made, with the settings it
    had (after merging, its weight holds ``W + delta``: the merged model at the base's size, with rounding
    error). Returns how many layers it quantized."""
    bnb = require_bitsandbytes()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            settings = getattr(child, "_quantized_from", None)
            if settings is None:
                continue
            device = child.weight.device
            weight = child.weight.data.float()
            if settings["bits"] == 4:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=settings["compute_dtype"], compress_statistics=settings["compress_statistics"],
                                          quant_type=settings["quant_type"], quant_storage=settings["quant_storage"], device="meta")
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=settings["quant_type"],
                                                 compress_statistics=settings["compress_statistics"], blocksize=settings["blocksize"],
                                                 quant_storage=settings["quant_storage"])
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=settings["threshold"], device="meta")
                layer.weight = bnb.nn.Int8Params(weight.half(), requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, name, layer.to(device))  # moving a bitsandbytes parameter is what quantizes it
            count += 1
    return count


def forget_quantization(model: nn.Module) -> None:
    """Drop transformers' markers of a quantized model (after :func:`dequantize_model`), so ``save_pretrained``
    writes an ordinary model and ``from_pretrained`` reads one."""
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if attr in model.__dict__:
            del model.__dict__[attr]
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(model, "quantization_method"):
        try:
            del model.quantization_method
        except AttributeError:
            pass


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Ready a (quantized) transformers model for adapter training, as ``peft.prepare_model_for_kbit_training``:

    1. freeze every parameter of the base model;
    2. store the parameters that are not quantized (norms, embeddings, the output head) in fp32 when they are
       fp16/bf16: small, and their rounding in 16 bits hurts training more than it saves memory;
    3. with ``use_gradient_checkpointing`` (and a model loaded in 4 or 8 bits), recompute activations in the
       backward pass; with reentrant checkpointing (the default unless ``gradient_checkpointing_kwargs`` says
       ``use_reentrant=False``), also make the input embeddings' output require grad, without which the
       checkpointed blocks would pass no gradient to the adapters.

    Returns ``model`` (changed in place).
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if is_quantized_linear(module):
            continue
        for param in module.parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    loaded_in_kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    if loaded_in_kbit and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the base model's weights take: ``linear`` (the layers that quantization replaces: every linear
    layer but the output head, quantized or not, with the quantization scales), ``other`` (embeddings, norms,
    the output head) and ``total``. Counts each tensor once (tied weights share storage)."""
    seen: set[int] = set()

    def size(t: torch.Tensor | None) -> int:
        if t is None or not isinstance(t, torch.Tensor) or id(t) in seen:
            return 0
        seen.add(id(t))
        return t.numel() * t.element_size()

    def quant_state_bytes(weight) -> int:
        state = getattr(weight, "quant_state", None)
        if state is not None:  # 4-bit: per-block absmax, and with double quantization its own scales and code
            total = size(state.absmax) + size(getattr(state, "code", None))
            inner = getattr(state, "state2", None)
            if inner is not None:
                total += size(inner.absmax) + size(inner.code) + size(getattr(state, "offset", None))
            return total
        return size(getattr(weight, "SCB", None))

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head = getattr(head, "base_layer", head)
    linear = other = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if isinstance(module, nn.Linear) and module is not head:
            linear += sum(size(t) for t in own) + quant_state_bytes(module.weight)
        else:
            other += sum(size(t) for t in own)
    return {"linear": linear, "other": other, "total": linear + other}
