"""Peak memory of LoRA training vs full fine-tuning on SmolLM2-135M, the same batch, each in its own process.

Both run the step of ``bench_train_step.py`` (peftkit, logits and loss at target positions, AdamW, fp32
and, where bf16 is fast, under bf16 autocast as ``peftkit train`` runs it, with the frozen linear weights
stored in bf16) for 3 steps on 4 x 256 DialogSum tokens: LoRA r=8 on q/v vs every parameter trained
(``FullConfig``). Memory is the process's peak RSS (on a GPU: ``torch.cuda.max_memory_allocated``), so it
includes the model weights both share; the gradients and AdamW's two states per trained parameter are what
full fine-tuning adds. A third process only loads the model, as the floor. On a CPU, under bf16, both are
measured again with their decoder blocks compiled (``peftkit train``'s default for a run of 100k tokens or more,
:func:`peftkit.train.compile.auto_compile`); the compile's own memory counts, as it would in a run.

    .venv/bin/python bench/bench_memory.py [--no-bf16] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import check, load_average, load_base, peak_rss_mib, print_rows, run_worker, save, set_threads

from peftkit.precision import bf16_support

STEP_SCRIPT = str(Path(__file__).resolve().parent / "bench_train_step.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure under bf16 autocast (default: where bf16 is fast)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name or model directory")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure both with compiled decoder blocks, as `peftkit train` runs long bf16 runs "
                             "(default: on a CPU; its compile's own memory counts)")
    parser.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.load_only:
        load, _, _ = load_base(args.model)
        load().to(args.device)
        print(json.dumps({"peak_mib": peak_rss_mib()}))
        return
    load_start = load_average()
    bf16 = bf16_support(torch.device(args.device))[0] if args.bf16 is None else args.bf16
    if args.compile is None:  # where `peftkit train` compiles by default
        args.compile = args.device == "cpu"
    unit = "GPU max allocated" if args.device == "cuda" else "peak RSS"
    floor = run_worker([__file__, "--load-only", "--model", args.model])["peak_mib"] if args.device == "cpu" else None
    peak, rows = {}, []
    settings = [("fp32", "", "fp32")]
    if bf16:
        settings.append(("bf16", "", "bf16 autocast, `peftkit train --no-compile`"))
        if args.compile:
            settings.append(("bf16", "_compiled", "bf16 autocast, compiled blocks: `peftkit train`'s default from 100k tokens"))
    for precision, compiled, label in settings:
        extra = ["--worker-bf16"] if precision == "bf16" else []
        for kind in ("lora", "full"):
            worker = ("peftkit" if kind == "lora" else "full") + compiled
            peak[f"{kind}/{precision}{compiled}"] = run_worker([STEP_SCRIPT, "--worker", worker, "--device", args.device,
                                                                "--model", args.model, *extra])["peak_mib"]
        lora, full = peak[f"lora/{precision}{compiled}"], peak[f"full/{precision}{compiled}"]
        rows.append(check(f"LoRA training peak memory / full fine-tuning ({label})", lora / full, "<= 0.35",
                          f"{lora:.0f} MiB vs {full:.0f} MiB ({unit}; both peftkit, {label}, AdamW)"
                          + (f"; loading the model alone: {floor:.0f} MiB" if floor else "")))
    if floor:
        peak["model_only"] = floor
    print_rows(f"memory: SmolLM2-135M, batch 4 x 256 tokens, 3 AdamW steps, {args.device}", rows)
    save("memory", {"rows": rows, "peak_mib": peak, "settings": vars(args), "load_average_at_start": load_start})


if __name__ == "__main__":
    sys.exit(main())
