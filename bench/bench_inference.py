"""Inference with LoRA adapters on SmolLM2-135M: peftkit vs the reference ``peft``, measured in the same run.

1. Unmerged-LoRA overhead over the merged model: greedy ``generate`` at batch 1 (``--prompt-tokens`` prompt,
   exactly ``--new-tokens`` new tokens) with the adapter kept separate (peftkit's default generate, which folds
   the adapter per call; peftkit with ``fold_adapter=False``; and ``peft``) vs the plain
   model returned by ``merge_and_unload()``; non-zero LoRA weights (a fresh adapter's B = 0 would hide its cost).
   ``peft`` is measured both ways: unmerged, and merged in place with ``merge_adapter()`` (its fastest way to
   serve one adapter), and peftkit's default is compared with the latter.
2. Switching adapters: ``set_adapter`` between two adapters loaded for inference vs loading the model and the
   other adapter from disk.
3. A mixed batch of 8 rows, each with its own adapter (``adapter_names=[...]``): throughput peftkit / ``peft``
   (both ``generate``, the same weights, left-padded prompts of random length) and the generated tokens
   compared row by row.

Each part runs in fp32 and, with ``--bf16`` (default where bf16 is fast), in bf16 too: autocast over bf16
linear weights for every candidate alike (what ``peftkit eval`` does by default). Random prompt tokens, seed 0.

    .venv/bin/python bench/bench_inference.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

import peft
import torch
from common import (check, copy_lora_to_peft, interleaved, left_padded_prompts, load_average, load_base, median,
                    print_rows, save, set_threads)

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.precision import bf16_support, cast_linear_weights_to_bf16

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def randomize(model, seed: int) -> None:
    """Non-zero LoRA weights, the same for models with the same structure."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def generate(model, ids, mask, new_tokens, bf16: bool, **kw):
    autocast = torch.autocast(ids.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=2, **kw)


def unmerged_overhead(load, args, bf16: bool, label: str) -> tuple[list[dict], dict]:
    prepare = cast_linear_weights_to_bf16 if bf16 else (lambda m: m)
    ours = get_peft_model(load(), LoraConfig(**LORA)).eval()
    randomize(ours, 0)
    merged = get_peft_model(load(), LoraConfig(**LORA)).eval()
    randomize(merged, 0)
    merged = prepare(merged.merge_and_unload())  # merged in fp32, then cast, like a merged checkpoint
    theirs = peft.get_peft_model(load(), peft.LoraConfig(**LORA)).eval()
    copy_lora_to_peft(ours, theirs, ["default"])
    # peft at its best for one adapter: merged into the base weights in place (``merge_adapter()``), in fp32
    # before the bf16 cast, as one would for serving a single adapter
    theirs_merged = peft.get_peft_model(load(), peft.LoraConfig(**LORA)).eval()
    copy_lora_to_peft(ours, theirs_merged, ["default"])
    theirs_merged.merge_adapter()
    ours, theirs, theirs_merged = prepare(ours), prepare(theirs), prepare(theirs_merged)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 49000, (1, args.prompt_tokens), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    out = {}
    times = interleaved(
        {
            "merged": lambda: out.__setitem__("merged", generate(merged, ids, mask, args.new_tokens, bf16)),
            "peftkit": lambda: out.__setitem__("peftkit", generate(ours, ids, mask, args.new_tokens, bf16)),
            "peftkit_unfolded": lambda: out.__setitem__(
                "peftkit_unfolded", generate(ours, ids, mask, args.new_tokens, bf16, fold_adapter=False)),
            "peft": lambda: out.__setitem__("peft", generate(theirs, ids, mask, args.new_tokens, bf16)),
            "peft_merged": lambda: out.__setitem__("peft_merged", generate(theirs_merged, ids, mask, args.new_tokens, bf16)),
        },
        repeats=args.repeats,
    )
    med = {k: median(v) for k, v in times.items()}
    same = {k: bool(torch.equal(out[k], out["merged"])) for k in ("peftkit", "peftkit_unfolded", "peft", "peft_merged")}
    result = {"median_s": med, "times_s": times, "tokens_equal_to_merged": same}
    rows = [
        check(f"unmerged LoRA generation overhead over merged, peftkit ({label})", med["peftkit"] / med["merged"] - 1, "<= 0.05",
              f"{med['peftkit']:.3f} s vs {med['merged']:.3f} s merged; tokens equal to merged: {same['peftkit']}"),
        check(f"unmerged LoRA generation overhead over merged, peftkit fold_adapter=False ({label})",
              med["peftkit_unfolded"] / med["merged"] - 1, None,
              f"{med['peftkit_unfolded']:.3f} s: the adapter's two extra matmuls in every step; tokens equal to merged: "
              f"{same['peftkit_unfolded']}"),
        check(f"unmerged LoRA generation overhead over merged, peft ({label})", med["peft"] / med["merged"] - 1, None,
              f"{med['peft']:.3f} s; tokens equal to merged: {same['peft']}"),
        check(f"generation time, peftkit (adapter kept separate) / peft merge_adapter() ({label})",
              med["peftkit"] / med["peft_merged"], "<= 1.05",
              f"{med['peftkit']:.3f} s vs {med['peft_merged']:.3f} s; peftkit [PeftModel.generate, adapter folded per call, "
              f"{label}] vs peft [adapter merged into the weights in place, {label}]; peft merged tokens equal to "
              f"merged: {same['peft_merged']}"),
    ]
    return rows, result


def switching(load, args) -> tuple[list[dict], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        model = get_peft_model(load(), LoraConfig(**LORA))
        model.add_adapter("other", LoraConfig(**LORA))
        randomize(model, 0)
        model.save_pretrained(tmp)  # default at the top, "other" in a sub-folder
        served = PeftModel.from_pretrained(load(), tmp).eval()  # loaded for inference, as a server would
        served.load_adapter(f"{tmp}/other", adapter_name="other")
        names = iter(["other", "default"] * 100_000)
        switch = interleaved({"switch": lambda: served.set_adapter(next(names))}, repeats=1000, warmup=10)["switch"]
        reload = interleaved({"reload": lambda: PeftModel.from_pretrained(load(), f"{tmp}/other").eval()}, repeats=3)["reload"]
    result = {"set_adapter_us": median(switch) * 1e6, "reload_s": median(reload)}
    rows = [
        check("set_adapter switch latency (ms)", median(switch) * 1e3, "<= 1.0", f"{median(switch) * 1e6:.1f} us"),
        check("reload (model + adapter from disk) / set_adapter", median(reload) / median(switch), ">= 1000",
              f"reload {median(reload):.2f} s"),
    ]
    return rows, result


def mixed_batch(load, args, bf16: bool, label: str) -> tuple[list[dict], dict]:
    n = args.adapters
    names = [f"task{i}" for i in range(n)]
    prepare = cast_linear_weights_to_bf16 if bf16 else (lambda m: m)
    ours = get_peft_model(load(), LoraConfig(**LORA), adapter_name=names[0]).eval()
    theirs = peft.get_peft_model(load(), peft.LoraConfig(**LORA), adapter_name=names[0]).eval()
    for name in names[1:]:
        ours.add_adapter(name, LoraConfig(**LORA))
        theirs.add_adapter(name, peft.LoraConfig(**LORA))
    randomize(ours, 1)
    copy_lora_to_peft(ours, theirs, names)
    ours, theirs = prepare(ours), prepare(theirs)
    ids, mask, lengths = left_padded_prompts(n, args.prompt_tokens)
    ids, mask = ids.to(args.device), mask.to(args.device)
    base = prepare(load())  # the same batch without adapters: what the adapters add on top of it
    out = {}
    times = interleaved(
        {
            "base": lambda: generate(base, ids, mask, args.new_tokens, bf16),
            "peftkit": lambda: out.__setitem__("peftkit", generate(ours, ids, mask, args.new_tokens, bf16, adapter_names=names)),
            "peft": lambda: out.__setitem__("peft", generate(theirs, ids, mask, args.new_tokens, bf16, adapter_names=names)),
        },
        repeats=args.repeats,
    )
    med = {k: median(v) for k, v in times.items()}
    equal_rows = int((out["peftkit"] == out["peft"]).all(dim=1).sum())
    tokens = n * args.new_tokens
    added = {k: med[k] - med["base"] for k in ("peftkit", "peft")}
    result = {"median_s": med, "times_s": times, "tokens_per_s": {k: tokens / v for k, v in med.items()},
              "adapter_seconds": added, "equal_rows": equal_rows, "rows": n, "prompt_lengths": lengths.tolist()}
    rows = [
        check(f"mixed batch ({n} adapters) throughput peftkit / peft ({label})", med["peft"] / med["peftkit"], ">= 2.0",
              f"{tokens / med['peftkit']:.1f} vs {tokens / med['peft']:.1f} new tokens/s; peft [adapter_names=..., "
              f"{label}] (merging cannot serve several adapters in one batch); the model without adapters: "
              f"{tokens / med['base']:.1f}"),
        check(f"mixed batch time added by the adapters, peft / peftkit ({label})", added["peft"] / max(added["peftkit"], 1e-9), None,
              f"{added['peftkit']:.2f} s vs {added['peft']:.2f} s over the model without adapters ({med['base']:.2f} s)"),
        check(f"mixed batch rows equal to peft's ({label})", equal_rows / n, ">= 1.0", f"{equal_rows} of {n} rows"),
    ]
    return rows, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name or local model directory")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed repetitions per candidate")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8, help="rows (one adapter each) of the mixed batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure in bf16 (default: where bf16 is fast)")
    parser.add_argument("--parts", default="overhead,switch,mixed", help="comma-separated subset to run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    bf16 = bf16_support(device)[0] if args.bf16 is None else args.bf16
    load_start = load_average()
    load_cpu, _, _ = load_base(args.model)
    load = lambda: load_cpu().to(device)  # noqa: E731
    parts = args.parts.split(",")
    precisions = [("fp32", False)] + ([("bf16", True)] if bf16 else [])
    rows, results = [], {}
    for label, use_bf16 in precisions:
        if "overhead" in parts:
            r, results[f"unmerged_overhead_{label}"] = unmerged_overhead(load, args, use_bf16, label)
            rows += r
        if "mixed" in parts:
            r, results[f"mixed_batch_{label}"] = mixed_batch(load, args, use_bf16, label)
            rows += r
    if "switch" in parts:
        r, results["switch"] = switching(load, args)
        rows += r
    print_rows(f"inference: SmolLM2-135M, LoRA r=8 q/v, greedy, prompt {args.prompt_tokens}, {args.new_tokens} new tokens", rows)
    save("inference", {"rows": rows, "results": results, "settings": vars(args), "load_average_at_start": load_start})


if __name__ == "__main__":
    main()
