"""One LoRA training step on SmolLM2-135M: peftkit vs the reference ``peft``, same model, batch, config, dtype.

The batch is 4 x 256 tokens of DialogSum (prompt + summary, peftkit's default prompt; see
``common.dialogsum_training_batch``), LoRA r=8 (alpha 16, no dropout) on q_proj/v_proj, AdamW. A step is
forward, loss, backward, optimizer step. Candidates, interleaved in one process (medians of ``--repeats``):

* ``peft``: ``peft.get_peft_model``; ``model(**batch).loss`` (the usual step).
* ``peft (bf16 model)``, bf16 only: the same on a model loaded in bf16 (``dtype=torch.bfloat16``; peft keeps
  the adapter in fp32), under autocast: what a ``peft`` user would run for speed on bf16 hardware.
* ``peftkit (same step)``: peftkit's model with the same ``model(**batch).loss``: the wrapper's own cost.
* ``peftkit``: the step as ``peftkit train`` runs it: logits and loss only at target positions
  (``peftkit.train.loss.loss_fn``); the same loss value.
* ``peftkit, compiled``, bf16 only: the ``peftkit`` step with the decoder blocks compiled by ``torch.compile`` as
  ``peftkit train`` compiles them (:mod:`peftkit.train.compile`: dynamic shapes, the first block eager). Its warmup,
  timed apart, is a step and a step of a second length (32 tokens shorter), which must not compile again, as in
  training (``--no-compile`` leaves it out).

each in fp32 and, with ``--bf16`` (default where the CPU has AMX/AVX512-BF16 or on a GPU), under bf16 autocast
for both (fp32 adapter weights). Peak memory (RSS; GPU: max allocated) is measured per candidate in a
process of its own (3 steps).

The hardware limit (bf16): the FLOPs of peftkit's step (every matmul of forward and backward, counted by
``FlopCounterMode``, plus attention from the shapes; see ``roofline.py``) over this machine's peak bf16
matmul rate, measured in the same process with the same threads before and after the timed steps (the
best of both). The step's time over that limit is the ratio to bring toward 1.

    .venv/bin/python bench/bench_train_step.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch
from common import (
    check,
    dialogsum_training_batch,
    interleaved,
    load_average,
    load_base,
    median,
    peak_rss_mib,
    print_rows,
    run_worker,
    save,
    set_threads,
)

from roofline import analytic_step_flops, peak_matmul_rate, step_flops

from peftkit import LoraConfig, get_peft_model
from peftkit.methods.full import FullConfig
from peftkit.precision import bf16_support, norm_outputs_in_autocast_dtype, store_frozen_linear_weights_in_bf16
from peftkit.train.compile import compile_blocks
from peftkit.train.loss import loss_fn

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
CANDIDATES = ("peft", "peftkit_same_step", "peftkit")
BF16_ONLY = ("peft_bf16_model", "peftkit_compiled")
PEFTKIT_STEP = ("peftkit", "full", "peftkit_compiled", "full_compiled")  # as `peftkit train` runs it


def build(kind: str, load, device: torch.device, bf16: bool = False):
    """``(model, step)`` for one candidate; ``step(batch, bf16)`` runs one training step, returns the loss.
    With ``bf16``, ``peftkit`` and ``full`` are set up as ``peftkit train`` does for bf16 autocast (frozen
    linear weights stored in bf16; full fine-tuning has none)."""
    torch.manual_seed(0)
    if kind in ("full", "full_compiled"):  # full fine-tuning through the same entry point (bench_memory.py)
        model = get_peft_model(load(), FullConfig())
    elif kind in ("peft", "peft_bf16_model"):
        # imported here: peftkit's and full fine-tuning's memory workers must not carry peft (177 MiB of RSS)
        import peft

        if kind == "peft":  # B starts at zero in both, so the first step's loss is the base model's in both
            model = peft.get_peft_model(load(), peft.LoraConfig(**LORA))
        else:  # the model in bf16, the adapter in fp32 (peft's autocast_adapter_dtype)
            model = peft.get_peft_model(load().to(torch.bfloat16), peft.LoraConfig(**LORA))
    else:  # peftkit, peftkit_same_step, peftkit_compiled
        model = get_peft_model(load(), LoraConfig(**LORA))
    model.to(device).train()
    if bf16 and kind in PEFTKIT_STEP:
        store_frozen_linear_weights_in_bf16(model)
        norm_outputs_in_autocast_dtype(model)
    if kind.endswith("_compiled"):
        compile_blocks(model)  # as `peftkit train` compiles: after the weights took their dtype
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    target_only = kind in PEFTKIT_STEP

    def step(batch, bf16: bool) -> float:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            if target_only:
                total, n = loss_fn(model, batch, target_only=True)
                loss = total / n
            else:
                loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def peak_memory_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()


def worker(kind: str, bf16: bool, steps: int, device: torch.device, model: str) -> None:
    """Runs in its own process: a few steps of one candidate, then its peak memory as JSON."""
    load, tokenizer, _ = load_base(model)
    batch = {k: v.to(device) for k, v in dialogsum_training_batch(tokenizer).items()}
    _, step = build(kind, load, device, bf16)
    for _ in range(steps):
        step(batch, bf16)
    print(json.dumps({"peak_mib": peak_memory_mib(device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed steps per candidate")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure under bf16 autocast (default: where bf16 is fast)")
    parser.add_argument("--fp32", action=argparse.BooleanOptionalAction, default=True, help="also measure in fp32")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the step with compiled decoder blocks (bf16; compiling takes minutes on a busy CPU)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name or model directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", choices=(*CANDIDATES, *BF16_ONLY, "full", "full_compiled"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    if args.worker:
        return worker(args.worker, args.worker_bf16, 3, device, args.model)
    bf16 = bf16_support(device)[0] if args.bf16 is None else args.bf16
    load_start = load_average()

    load, tokenizer, _ = load_base(args.model)
    batch = {k: v.to(device) for k, v in dialogsum_training_batch(tokenizer, args.rows, args.tokens).items()}
    targets = int((batch["labels"][:, 1:] != -100).sum())
    precisions = ["fp32"] * args.fp32 + ["bf16"] * bf16
    if not precisions:
        parser.error("--no-fp32 leaves nothing to measure where bf16 is off (--bf16 to force it)")
    bf16_only = tuple(k for k in BF16_ONLY if args.compile or k != "peftkit_compiled")
    kinds = {p: CANDIDATES + (bf16_only if p == "bf16" else ()) for p in precisions}
    built = {f"{k}/{p}": build(k, load, device, p == "bf16") for p in precisions for k in kinds[p]}
    steps = {key: step for key, (_, step) in built.items()}
    shorter = {k: v[:, : args.tokens - 32] for k, v in batch.items()}
    first_loss, first_s = {}, {}
    for key in steps:  # also the warmup; the compiled candidate compiles here
        started = time.perf_counter()
        first_loss[key] = steps[key](batch, key.endswith("bf16"))
        if key.startswith("peftkit_compiled"):  # a second length, as in training: the graph already takes any length
            steps[key](shorter, True)
        first_s[key] = time.perf_counter() - started
    peak_before = peak_matmul_rate(device) if bf16 else None
    times = interleaved(
        {key: (lambda key=key: steps[key](batch, key.endswith("bf16"))) for key in steps},
        repeats=args.repeats, warmup=0,
    )
    med = {k: median(v) for k, v in times.items()}

    rows = []
    for p in precisions:
        ref = med[f"peft/{p}"]
        amp = "bf16 autocast" if p == "bf16" else "fp32"
        rows.append(check(f"train step {p}, peftkit (as `peftkit train` runs it) / peft", med[f"peftkit/{p}"] / ref, "<= 1.00",
                          f"{med[f'peftkit/{p}']:.3f} s vs {ref:.3f} s; peftkit [{amp}"
                          f"{', frozen linear weights in bf16' if p == 'bf16' else ''}, loss at target positions] vs "
                          f"peft [fp32 model, {amp}, HF loss over all positions]"))
        rows.append(check(f"train step {p}, peftkit same step (HF loss) / peft", med[f"peftkit_same_step/{p}"] / ref, None,
                          f"{med[f'peftkit_same_step/{p}']:.3f} s vs {ref:.3f} s: the wrappers alone; first-step losses "
                          f"{first_loss[f'peftkit/{p}']:.5f} (peftkit) vs {first_loss[f'peft/{p}']:.5f} (peft)"))
        if p == "bf16":
            if "peftkit_compiled/bf16" in med:
                ours = med["peftkit_compiled/bf16"]
                rows.append(check("train step bf16, peftkit with compiled decoder blocks / peftkit", ours / med["peftkit/bf16"],
                                  "<= 1.00", f"{ours:.3f} s vs {med['peftkit/bf16']:.3f} s (medians of {args.repeats}, interleaved); "
                                  f"warmup (compile, 2 steps of 2 lengths) {first_s['peftkit_compiled/bf16']:.1f} s vs first eager step "
                                  f"{first_s['peftkit/bf16']:.1f} s; first-step losses {first_loss['peftkit_compiled/bf16']:.5f} vs {first_loss['peftkit/bf16']:.5f}; "
                                  f"load {load_start} at start, {load_average()} now"))
            ref = med["peft_bf16_model/bf16"]
            rows.append(check("train step bf16, peftkit / peft on a bf16-loaded model", med["peftkit/bf16"] / ref, "<= 1.00",
                              f"{med['peftkit/bf16']:.3f} s vs {ref:.3f} s; peftkit [fp32 model, frozen linear weights in "
                              f"bf16, bf16 autocast, loss at target positions] vs peft [model loaded in bf16, fp32 adapter, "
                              f"bf16 autocast, HF loss over all positions]; first-step losses {first_loss['peftkit/bf16']:.5f} vs "
                              f"{first_loss['peft_bf16_model/bf16']:.5f}"))
    roofline = {}
    if bf16:
        peak_after = peak_matmul_rate(device)
        peak, shape = max(peak_before, peak_after)
        model = built["peftkit/bf16"][0]
        flops = step_flops(lambda: steps["peftkit/bf16"](batch, True), model.config, args.rows, args.tokens)
        adapted = {name: LORA["r"] for name in LORA["target_modules"]}
        analytic = analytic_step_flops(model.config, args.rows, args.tokens, targets, adapted)
        limit = flops["total"] / peak
        roofline = {"peak_flops": peak, "peak_shape": shape, "peak_before": peak_before[0], "peak_after": peak_after[0],
                    "step_flops": flops, "analytic_flops": analytic, "limit_s": limit}
        threads = torch.get_num_threads() if device.type == "cpu" else "-"
        # best step against the best matmul call: on a machine shared with other jobs both are the least
        # disturbed measurement of their kind (the median step is in the rows above)
        best = min(times["peftkit/bf16"])
        roofline["best_step_s"] = best
        rows.append(check("train step bf16, peftkit / hardware limit (step FLOPs / peak bf16 matmul rate)",
                          best / limit, "<= 2.00",
                          f"best step {best:.3f} s (median {med['peftkit/bf16']:.3f} s) vs {limit:.3f} s: {flops['total'] / 1e9:.0f} GFLOP (matmuls counted "
                          f"{flops['matmul'] / 1e9:.0f}, attention {flops['attention'] / 1e9:.0f}; from the config: "
                          f"{analytic['total'] / 1e9:.0f}) at {peak / 1e12:.3f} TFLOP/s (best bf16 matmul, {shape}, "
                          f"{threads} thread(s), measured in this run)"))
        if "peftkit_compiled/bf16" in times:
            best_compiled = min(times["peftkit_compiled/bf16"])
            roofline["best_compiled_step_s"] = best_compiled
            rows.append(check("train step bf16, peftkit compiled / hardware limit", best_compiled / limit, "<= 2.00",
                              f"best step {best_compiled:.3f} s (median {med['peftkit_compiled/bf16']:.3f} s) vs {limit:.3f} s"))
    memory = {}
    if args.memory:
        for p in precisions:
            for kind in kinds[p]:
                if kind in ("peftkit_same_step", "peftkit_compiled"):
                    continue
                extra = ["--worker-bf16"] if p == "bf16" else []
                threads = ["--threads", str(args.threads)] if args.threads else []
                memory[f"{kind}/{p}"] = run_worker([__file__, "--worker", kind, "--device", args.device, "--model", args.model, *extra, *threads])["peak_mib"]
            rows.append(check(f"train peak memory {p}, peftkit / peft", memory[f"peftkit/{p}"] / memory[f"peft/{p}"], None,
                              f"{memory[f'peftkit/{p}']:.0f} MiB vs {memory[f'peft/{p}']:.0f} MiB "
                              f"({'GPU max allocated' if device.type == 'cuda' else 'peak RSS'}, own process)"))
            if p == "bf16":
                rows.append(check("train peak memory bf16, peftkit / peft on a bf16-loaded model",
                                  memory["peftkit/bf16"] / memory["peft_bf16_model/bf16"], None,
                                  f"{memory['peftkit/bf16']:.0f} MiB vs {memory['peft_bf16_model/bf16']:.0f} MiB"))
    print_rows(f"training step: SmolLM2-135M, LoRA r=8 q/v, batch {args.rows} x {args.tokens} tokens ({targets} targets), {device}", rows)
    save("train_step", {"rows": rows, "median_s": med, "times_s": times, "first_loss": first_loss, "first_step_s": first_s, "peak_memory_mib": memory,
                        "roofline": roofline, "settings": {**vars(args), "targets": targets, "bf16": bf16},
                        "load_average_at_start": load_start})


if __name__ == "__main__":
    sys.exit(main())
