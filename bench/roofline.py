"""The hardware limit of a training step: its FLOPs over the machine's peak matrix-multiply rate.

``peak_matmul_rate`` measures the rate in the benchmark's own process (same threads, same moment, so the
machine's load at the time weighs on both alike); ``step_flops`` counts what one training step multiplies:
every matmul autograd runs, forward and backward (the frozen base's input gradients included, its weight
gradients not: nothing asks for them), counted by torch's ``FlopCounterMode``, plus attention, which that
counter does not see on a CPU (SDPA's CPU kernel has no FLOP formula there), counted from the shapes.
``analytic_step_flops`` is the same count from the model's config alone, as a cross-check.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["peak_matmul_rate", "step_flops", "analytic_step_flops", "attention_flops"]

# Square sizes and the model's own shape class (tokens x hidden @ hidden x intermediate): the best of them is
# the peak. Small ones fit in cache and finish between other processes' time slices on a loaded machine.
SHAPES = ((512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (1024, 576, 1536))


def peak_matmul_rate(device: torch.device, dtype: torch.dtype = torch.bfloat16, seconds: float = 1.0,
                     shapes: tuple[tuple[int, int, int], ...] = SHAPES) -> tuple[float, str]:
    """``(FLOP/s, shape)``: the best rate of ``torch.matmul`` in ``dtype`` over ``shapes`` (m, k, n), each
    timed repeatedly for about ``seconds`` (best single call), with the threads torch uses now."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best, best_shape = 0.0, ""
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        torch.matmul(a, b)  # warm up (oneDNN picks its kernel on the first call)
        sync()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.matmul(a, b)
            sync()
            rate = 2 * m * k * n / (time.perf_counter() - start)
            if rate > best:
                best, best_shape = rate, f"{m}x{k} @ {k}x{n}"
    return best, best_shape


def attention_flops(config, rows: int, tokens: int, causal: bool = True) -> int:
    """Forward + backward FLOPs of the attention products (QK^T and PV) of a decoder, all layers. Forward is
    2 matmuls of 2*S*S*d per row and layer (d = heads x head dim); backward is twice the forward; causal
    attention needs half of each (the blocks above the diagonal are skipped by the fused kernels)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    forward = 2 * (2 * rows * tokens * tokens * width) * config.num_hidden_layers
    return int(3 * forward * (0.5 if causal else 1.0))


def step_flops(step: Callable[[], object], config, rows: int, tokens: int) -> dict[str, int]:
    """Run ``step()`` (one training step: forward, backward, optimizer) under ``FlopCounterMode``: the
    matmul FLOPs it counted, the attention FLOPs from the shapes, and their total."""
    with FlopCounterMode(display=False) as counter:
        step()
    counted = int(counter.get_total_flops())
    attention = attention_flops(config, rows, tokens)
    return {"matmul": counted, "attention": attention, "total": counted + attention}


def analytic_step_flops(config, rows: int, tokens: int, targets: int, adapted: dict[str, int] | None = None) -> dict[str, int]:
    """The LoRA step's FLOPs from the config alone: every linear layer of the decoder forward (2 x tokens x
    in x out) and its input gradient backward (the same again), except the first layer's q/k/v, whose input
    (the embeddings) needs no gradient; the output head at the ``targets`` positions only (forward and input
    gradient; frozen, so no weight gradient); attention; and each LoRA pair (``adapted``: {module name: rank};
    forward, weight gradients and input gradients, the latter not in the first layer's q/k/v)."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    t, layers, reads_embeddings = rows * tokens, config.num_hidden_layers, ("q_proj", "k_proj", "v_proj")
    linear = sum(i * o for i, o in shapes.values()) * layers
    base = 2 * (2 * t * linear) - 2 * t * sum(i * o for name, (i, o) in shapes.items() if name in reads_embeddings)
    head = 2 * (2 * targets * h * config.vocab_size)
    lora = 0
    for name, r in (adapted or {}).items():
        i, o = shapes[name]
        # forward (A then B), the weight gradients of both, the input gradient through B (for A's) and through A
        lora += layers * 2 * t * r * (3 * i + 3 * o) - (2 * t * r * i if name in reads_embeddings else 0)
    attention = attention_flops(config, rows, tokens)
    return {"linear": base, "head": head, "lora": lora, "attention": attention, "total": base + head + lora + attention}
