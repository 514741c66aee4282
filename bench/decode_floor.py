"""Where the time of a mixed-batch generate goes on this machine, and how fast the base model alone can decode.

``bench_inference.py``'s mixed batch (8 rows, 8 adapters) compares peftkit with ``peft``; both run the same
``transformers`` model underneath, so the ratio is capped by that shared base decoder. This probe times the base
model alone (no adapters), on the same batch (left-padded random prompts of 64..128 tokens, seed 0):

1. ``generate``: transformers' ``generate``, as both candidates run it.
2. prefill: one forward over the padded prompts (output head on the last position only).
3. decode, one token per step, with the dynamic KV cache (what ``generate`` does), with a static (preallocated)
   cache, and with the static cache plus oneDNN-prepacked linear weights (``--packed``), the fastest eager
   variant found here. ``--compile`` adds ``torch.compile`` of the decode step (minutes to compile on a CPU).

It prints the floor: prefill + (new tokens - 1) x the fastest decode step, and the best mixed-batch ratio vs
``peft`` that floor would allow, using ``peft``'s time from ``bench/results/inference.json`` (the same machine and
settings; the floor is rescaled by that run's base-model ``generate`` time over this run's, for drift in speed).

    .venv/bin/python bench/decode_floor.py [--threads 1] [--packed] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from common import RESULTS, left_padded_prompts, load_base, median, set_threads
from transformers import DynamicCache, StaticCache

from peftkit.precision import bf16_support, cast_linear_weights_to_bf16


def pack_linear_weights(model: torch.nn.Module, bf16: bool, rows: int) -> None:
    """Every ``nn.Linear`` computes with a oneDNN-prepacked copy of its weight (probe only: private ops)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight.detach().to(torch.bfloat16 if bf16 else torch.float32)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size=rows)

            def forward(x, packed=packed, bias=module.bias, bf16=bf16):
                flat = x.reshape(-1, x.shape[-1])
                y = torch.ops.mkldnn._linear_pointwise(flat.to(torch.bfloat16) if bf16 else flat, packed, bias, "none", [], "")
                return y.reshape(*x.shape[:-1], -1)

            module.forward = forward


def decode(model, forward, ids, mask, new_tokens: int, static: bool) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds, new tokens): greedy, one token per step after the prefill."""
    n, prompt = ids.shape
    full = torch.cat([mask, torch.ones(n, new_tokens, dtype=mask.dtype)], 1)
    positions = (full.cumsum(1) - 1).clamp(min=0)
    if static:
        cache = StaticCache(config=model.config, max_cache_len=prompt + new_tokens)
        step_mask = lambda t: full  # noqa: E731  (static shapes: the whole mask, future columns zero-filled by the cache)
    else:
        cache = DynamicCache()
        step_mask = lambda t: full[:, : t + 1]  # noqa: E731
    started = time.perf_counter()
    out = model(input_ids=ids, attention_mask=full if static else mask, past_key_values=cache, cache_position=torch.arange(prompt),
                position_ids=positions[:, :prompt], logits_to_keep=1, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [token]
    prefilled = time.perf_counter()
    for i in range(new_tokens - 1):
        t = prompt + i
        out = forward(input_ids=token, attention_mask=step_mask(t), past_key_values=cache, cache_position=torch.tensor([t]),
                      position_ids=positions[:, t : t + 1], use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return prefilled - started, time.perf_counter() - prefilled, torch.cat(tokens, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name or local model directory")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="also bf16 (default: where fast)")
    parser.add_argument("--packed", action="store_true", help="also time oneDNN-prepacked linear weights")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the decode step")
    args = parser.parse_args()
    set_threads(args.threads)
    load, _, _ = load_base(args.model)
    ids, mask, _ = left_padded_prompts(args.rows, args.prompt_tokens)
    bf16 = bf16_support(torch.device("cpu"))[0] if args.bf16 is None else args.bf16
    reference = RESULTS / "inference.json"
    peft_s = {}
    if reference.is_file():
        then = json.loads(reference.read_text())
        ran = then.get("settings", {})
        same = (ran.get("model"), ran.get("adapters"), ran.get("prompt_tokens"), ran.get("new_tokens")) == (
            args.model, args.rows, args.prompt_tokens, args.new_tokens)
        if same:
            results = then["results"]
            peft_s = {label: results[f"mixed_batch_{label}"]["median_s"] for label in ("fp32", "bf16") if f"mixed_batch_{label}" in results}
        else:
            print(f"decode_floor: {reference} was measured with other settings; no ratio vs peft")
    for label, use_bf16 in [("fp32", False)] + ([("bf16", True)] if bf16 else []):
        model = load()
        if use_bf16:
            model = cast_linear_weights_to_bf16(model)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        timings: dict[str, list[float]] = {}
        with torch.no_grad(), autocast:
            def generate():
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=2)

            generated = generate()
            for _ in range(args.repeats):
                started = time.perf_counter()
                generate()
                timings.setdefault("generate", []).append(time.perf_counter() - started)
            variants = {"dynamic cache": (model.forward, False), "static cache": (model.forward, True)}
            if args.compile:
                variants["static cache, compiled"] = (torch.compile(model.forward, dynamic=False), True)
            same = {}
            for name, (forward, static) in variants.items():
                decode(model, forward, ids, mask, args.new_tokens, static)  # warm-up (compiles)
                for _ in range(args.repeats):
                    prefill_s, decode_s, tokens = decode(model, forward, ids, mask, args.new_tokens, static)
                    timings.setdefault("prefill", []).append(prefill_s)
                    timings.setdefault(name, []).append(decode_s / (args.new_tokens - 1))
                same[name] = bool(torch.equal(tokens, generated[:, ids.shape[1]:]))
            if args.packed:
                pack_linear_weights(model, use_bf16, args.rows)
                decode(model, model.forward, ids, mask, args.new_tokens, True)
                for _ in range(args.repeats):
                    prefill_s, decode_s, tokens = decode(model, model.forward, ids, mask, args.new_tokens, True)
                    timings.setdefault("static cache, packed weights", []).append(decode_s / (args.new_tokens - 1))
                same["static cache, packed weights"] = bool(torch.equal(tokens, generated[:, ids.shape[1]:]))
        med = {k: median(v) for k, v in timings.items()}
        steps = [k for k in med if k not in ("generate", "prefill")]
        best = min(steps, key=med.get)
        floor = med["prefill"] + (args.new_tokens - 1) * med[best]
        print(f"\n== base model alone, {label}: {args.rows} rows, prompts <= {args.prompt_tokens} tokens, {args.new_tokens} new tokens ==")
        print(f"  transformers generate          {med['generate']:.2f} s")
        print(f"  prefill                        {med['prefill']:.2f} s")
        for name in steps:
            print(f"  decode step, {name:<30} {1000 * med[name]:.1f} ms  (tokens equal to generate's: {same[name]})")
        print(f"  floor: prefill + {args.new_tokens - 1} x '{best}' = {floor:.2f} s")
        if label in peft_s:  # that run's base-model generate time rescales the floor to that run's machine speed
            then = peft_s[label]
            scaled = floor * then["base"] / med["generate"]
            print(f"  bench/results/inference.json: peft {then['peft']:.2f} s, base model {then['base']:.2f} s (here {med['generate']:.2f} s);"
                  f" the floor at that run's speed {scaled:.2f} s -> at most {then['peft'] / scaled:.2f}x vs peft with adapters"
                  " that cost nothing (target 2.0x)")


if __name__ == "__main__":
    main()
