"""Inference with adapters on SmolLM2-135M: peftkit vs the reference ``peft``, measured in the same run.

1. Unmerged-LoRA overhead over the merged model (greedy generation, batch 1).
2. ``set_adapter`` switch latency vs reloading the model and adapter from disk.
3. A mixed batch of 8 rows with 8 different adapters: throughput peftkit / ``peft``'s ``adapter_names``
   path, and the generated tokens equal row by row.

    python bench/bench_inference.py [--model smollm2-135m-instruct] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import peft
import torch
from common import check, interleaved, median, print_rows, save
from transformers import AutoModelForCausalLM

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.hub import resolve_model


def randomize(model, seed: int) -> None:
    """Non-zero LoRA weights (a fresh adapter is a no-op and would hide the cost of B)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def generate(model, ids, mask, new_tokens, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=2, **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name or local model directory")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed repetitions per candidate")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    path = resolve_model(args.model)
    load = lambda: AutoModelForCausalLM.from_pretrained(path).eval()  # noqa: E731
    config = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    rows, results = [], {}

    # 1. unmerged overhead over merged -------------------------------------------------------------
    ids = torch.randint(100, 49000, (1, args.prompt_tokens))
    mask = torch.ones_like(ids)
    ours = get_peft_model(load(), LoraConfig(**config)).eval()
    randomize(ours, 0)
    merged = get_peft_model(load(), LoraConfig(**config)).eval()
    randomize(merged, 0)
    merged.merge_adapter()
    theirs = peft.get_peft_model(load(), peft.LoraConfig(**config)).eval()
    randomize(theirs, 0)
    times = interleaved(
        {
            "merged": lambda: generate(merged, ids, mask, args.new_tokens),
            "peftkit_unmerged": lambda: generate(ours, ids, mask, args.new_tokens),
            "peft_unmerged": lambda: generate(theirs, ids, mask, args.new_tokens),
        },
        repeats=args.repeats,
    )
    med = {k: median(v) for k, v in times.items()}
    overhead = med["peftkit_unmerged"] / med["merged"] - 1
    results["unmerged_overhead"] = {"median_s": med, "peftkit_overhead": overhead, "peft_overhead": med["peft_unmerged"] / med["merged"] - 1}
    rows.append(check("unmerged LoRA generation overhead over merged", overhead, "<= 0.05"))
    del merged, theirs

    # 2. set_adapter vs reloading -------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        ours.add_adapter("other", LoraConfig(**config))
        ours.save_pretrained(tmp)
        names = iter(["other", "default"] * 10_000)
        switch = interleaved({"switch": lambda: ours.set_adapter(next(names))}, repeats=200, warmup=5)["switch"]
        reload = interleaved({"reload": lambda: PeftModel.from_pretrained(load(), tmp).eval()}, repeats=3)["reload"]
    results["switch"] = {"set_adapter_us": median(switch) * 1e6, "reload_s": median(reload)}
    rows.append(check("set_adapter latency (ms)", median(switch) * 1e3, "<= 1.0"))
    rows.append(check("reload / set_adapter time", median(reload) / median(switch), ">= 1000"))
    ours.delete_adapter("other")

    # 3. mixed batch of 8 adapters ------------------------------------------------------------------
    n = 8
    names = [f"task{i}" for i in range(n)]
    for i, name in enumerate(names):
        ours.add_adapter(name, LoraConfig(**config))
    randomize(ours, 1)
    theirs = peft.get_peft_model(load(), peft.LoraConfig(**config), adapter_name=names[0]).eval()
    for name in names[1:]:
        theirs.add_adapter(name, peft.LoraConfig(**config))
    with torch.no_grad():  # the same weights in both
        mine = dict(ours.named_parameters())
        for key, p in theirs.named_parameters():
            if "lora_" in key:
                for name in names:
                    if f".{name}." in key:
                        layer = key.split(".lora_")[0].removeprefix("base_model.model.")
                        tensor = "lora_A" if ".lora_A." in key else "lora_B"
                        p.copy_(mine[f"base_model.{layer}.adapters.{name}.{tensor}.weight"])
    lengths = torch.randint(args.prompt_tokens // 2, args.prompt_tokens, (n,))
    ids = torch.full((n, args.prompt_tokens), 2)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):  # left padding
        ids[row, -length:] = torch.randint(100, 49000, (int(length),))
        mask[row, -length:] = 1
    out = {}
    times = interleaved(
        {
            "peftkit": lambda: out.__setitem__("peftkit", generate(ours, ids, mask, args.new_tokens, adapter_names=names)),
            "peft": lambda: out.__setitem__("peft", generate(theirs, ids, mask, args.new_tokens, adapter_names=names)),
        },
        repeats=args.repeats,
    )
    med = {k: median(v) for k, v in times.items()}
    equal_rows = int((out["peftkit"] == out["peft"]).all(dim=1).sum())
    tokens = n * args.new_tokens
    results["mixed_batch"] = {"median_s": med, "tokens_per_s": {k: tokens / v for k, v in med.items()}, "equal_rows": equal_rows, "rows": n}
    rows.append(check("mixed batch (8 adapters) throughput peftkit / peft", med["peft"] / med["peftkit"], ">= 2.0"))
    rows.append(check("mixed batch rows equal to peft's", equal_rows / n, ">= 1.0"))

    print_rows("inference (SmolLM2-135M, fp32, LoRA r=8 q/v)", rows)
    save("inference", {"rows": rows, "results": results, "settings": vars(args), "time": time.time()})


if __name__ == "__main__":
    main()
