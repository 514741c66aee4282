"""Generation latency per example, one row at a time, as a user waiting for one answer sees it.

Each row's prompt is generated alone (batch of 1, greedy or the run's beams, up to ``max_new_tokens``),
in the same precision as the evaluation. An adapter that can be merged is timed twice on the same rows:
attached (unmerged, the adapter's extra work in every forward pass) and folded into the weights
(merged, the base model's cost). The two are interleaved row by row, alternating which goes first, so
a change in the machine's load affects both alike; one warm-up generation per model is not timed.
Latency depends on how many tokens a model writes before it stops, so the time per generated token
is reported too: a model that rambles to ``max_new_tokens`` is slower per example, not per token.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..data import PromptFormat, collate_prompts, load_encoded
from ..evaluate import GenerationSettings, load_for_inference
from ..evaluate.generate import new_tokens
from ..hub import is_seq2seq
from ..model import PeftModel
from ..precision import autocast, cast_linear_weights_to_bf16, resolve_precision
from ..registry import tuner_for


def count_parameters(model: torch.nn.Module) -> int:
    """All parameters of ``model`` (a tied tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def measure_latency(model: str, adapter: str | None, data: str, fmt: PromptFormat, generation: GenerationSettings,
                    rows: int, cpu: bool = False) -> dict[str, Any]:
    """Time generation on the first ``rows`` rows of ``data``; ``rows == 0`` only counts parameters.

    Returns ``{"total_params", "rows", "unmerged": {...}, "merged": {...} | None}``, each timing
    ``{"s_per_example", "ms_per_token", "new_tokens_per_example"}``. ``merged`` is ``None`` without an
    adapter or when the adapter cannot be merged (soft prompts, bottleneck adapters).
    """
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    net, tokenizer, _ = load_for_inference(model, adapter, device)
    total = count_parameters(net)
    if rows == 0:
        return {"total_params": total, "rows": 0, "unmerged": None, "merged": None}
    variants = {"unmerged": net}
    if adapter is not None and tuner_for(net.peft_config[net.active_adapter]).mergeable:
        # Merging works on the fp32 weights; the bf16 copy is made afterwards, as for the unmerged model.
        variants["merged"] = load_for_inference(model, adapter, device)[0].merge_and_unload()
    use_bf16, _ = resolve_precision(generation.precision, device)
    if use_bf16:
        for m in variants.values():
            cast_linear_weights_to_bf16(m)
    seq2seq = is_seq2seq(net.config)
    items = load_encoded(data, tokenizer, fmt, seq2seq, limit=rows)[1].items

    def generate(m, item, max_new_tokens: int = generation.max_new_tokens) -> tuple[float, int]:
        batch = {k: v.to(device) for k, v in collate_prompts([item], tokenizer.pad_token_id, "right").items()}
        beams = {"num_beams": generation.num_beams, "early_stopping": True} if generation.num_beams > 1 else {}
        _sync(device)
        start = time.perf_counter()
        # Unmerged means the adapter's extra work in every forward pass, so not the per-call fold that
        # PeftModel.generate does by default (which runs at the merged model's speed; see bench/).
        unfold = {"fold_adapter": False} if isinstance(m, PeftModel) else {}
        with autocast(device, use_bf16):
            out = m.generate(**batch, **beams, **unfold, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        _sync(device)
        return time.perf_counter() - start, new_tokens(out, batch["input_ids"], seq2seq).shape[1]

    for m in variants.values():
        generate(m, items[0], max_new_tokens=4)  # warm-up: first-call allocations and kernel choices are not latency
    seconds = {k: 0.0 for k in variants}
    tokens = {k: 0 for k in variants}
    for i, item in enumerate(items):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for k in order:
            s, n = generate(variants[k], item)
            seconds[k] += s
            tokens[k] += n
    timings = {
        k: {"s_per_example": seconds[k] / len(items), "ms_per_token": 1000 * seconds[k] / max(tokens[k], 1),
            "new_tokens_per_example": tokens[k] / len(items)}
        for k in variants
    }
    return {"total_params": total, "rows": len(items), "unmerged": timings["unmerged"], "merged": timings.get("merged")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
