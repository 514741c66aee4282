"""LoRA on a quantized base (nf4, int8: ``peftkit train --quantize``) against LoRA on the bf16 base, in one run.

Each side trains the same LoRA (r=8 on q/v, lr 2e-3, 24 steps of 4 rows: ``make demo``'s LoRA) on the demo's
training rows with ``peftkit train`` in its own process, under bf16 autocast where bf16 is fast (as ``peftkit
train`` runs it: the frozen linear weights of the unquantized base are then stored in bf16), then is scored with
``peftkit eval`` (ROUGE-L, greedy) on the demo's evaluation rows, on the base it trained on. Reported, as ratios
quantized / bf16:

- base-weight bytes: the linear layers that quantization replaces (every one but the output head, with their
  quantization scales) and the whole model (embeddings and norms stay unquantized on every side);
- peak training memory: the training process's peak RSS (GPU: max allocated), model loading included;
- step time: training seconds per step (noisy on a shared machine: read it as a rough indication);
- quality: ROUGE-L difference in points.

    .venv/bin/python bench/bench_quantized.py [--model smollm2-135m-instruct] [--eval-rows 47]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import REPO, check, load_average, print_rows, save, set_threads

DEMO = REPO / "src" / "peftkit" / "data" / "demo"
SIDES = ("none", "nf4", "int8")
LABEL = {"none": "bf16 base", "nf4": "nf4 base (double quant, bf16 compute)", "int8": "int8 base (LLM.int8())"}


def peftkit(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "peftkit.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"peftkit {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def weight_bytes_of(model: str, quantize: str, bf16: bool) -> dict[str, int]:
    """The base's weight bytes as ``peftkit train`` holds them: quantized layers as loaded; under bf16 the other
    frozen linear weights (all of them on the unquantized base, the output head on a quantized one) in bf16."""
    from peftkit.hub import load_model
    from peftkit.precision import store_frozen_linear_weights_in_bf16
    from peftkit.quantize import weight_bytes

    base, _ = load_model(model, quantize=quantize)
    base.requires_grad_(False)
    if bf16:
        store_frozen_linear_weights_in_bf16(base)
    sizes = weight_bytes(base)
    del base
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name or model directory")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--eval-rows", type=int, default=47, help="demo evaluation rows scored (47: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, also of the peftkit processes it starts "
                        "(OMP_NUM_THREADS; default: one per core)")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--sides", default=",".join(SIDES), help="which bases to run: none (the bf16 reference), nf4, "
                        "int8; a side not run is read from an earlier run in --work (its run.json and eval/metrics.json)")
    args = parser.parse_args()
    set_threads(args.threads)
    from peftkit.precision import bf16_support

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = bf16_support(torch.device(device))[0]
    load_start = load_average()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-quantized-"))
    train_settings = ["--method", "lora", "--target-modules", "q_proj,v_proj", "--lr", "2e-3", "--max-steps", str(args.steps),
                      "--batch-size", "4", "--report-to", "none", "--seed", "0"]
    results: dict[str, dict] = {}
    run_now = set(args.sides.split(","))
    for side in SIDES:
        out = work / side
        if side not in run_now and (out / "eval" / "metrics.json").is_file():
            print(f"  {side}: read from the earlier run in {out}", flush=True)
        else:
            peftkit("train", "--model", args.model, "--data", str(DEMO / "demo_train.jsonl"), "--output", str(out),
                    "--quantize", side, *train_settings)
            peftkit("eval", "--adapter", str(out), "--data", str(DEMO / "demo_eval.jsonl"), "--limit", str(args.eval_rows),
                    "--max-new-tokens", "64", "--output", str(out / "eval"))
        run = json.loads((out / "run.json").read_text())
        metrics = json.loads((out / "eval" / "metrics.json").read_text())
        results[side] = {
            "weight_bytes": weight_bytes_of(args.model, side, bf16),
            "peak_mib": run["peak_gpu_memory_mb"] if device == "cuda" else run["peak_rss_mb"],
            "step_s": run["train_time_s"] / run["steps"],
            "final_loss": run["final_loss"],
            "rougeL": metrics["rougeL"],
            "precision": run["precision"],
            "measured": "this run" if side in run_now else "an earlier run",
        }
        print(f"  {side}: {json.dumps(results[side])}", flush=True)

    ref = results["none"]
    rows = []
    unit = "GPU max allocated" if device == "cuda" else "peak RSS"
    for side in ("nf4", "int8"):
        r = results[side]
        against = f"{LABEL[side]} vs {LABEL['none']}"
        rows.append(check(f"{side}/bf16 base-weight bytes (quantized linear layers)", r["weight_bytes"]["linear"] / ref["weight_bytes"]["linear"],
                          "<= 0.35" if side == "nf4" else None,
                          f"{r['weight_bytes']['linear'] / 2**20:.1f} MiB vs {ref['weight_bytes']['linear'] / 2**20:.1f} MiB; {against}"))
        rows.append(check(f"{side}/bf16 base-weight bytes (whole model)", r["weight_bytes"]["total"] / ref["weight_bytes"]["total"], None,
                          f"{r['weight_bytes']['total'] / 2**20:.1f} MiB vs {ref['weight_bytes']['total'] / 2**20:.1f} MiB "
                          f"(embeddings/norms unquantized: {ref['weight_bytes']['other'] / 2**20:.1f} MiB on the bf16 side)"))
        rows.append(check(f"{side}/bf16 peak training memory", r["peak_mib"] / ref["peak_mib"], None,
                          f"{r['peak_mib']:.0f} MiB vs {ref['peak_mib']:.0f} MiB ({unit}, model loading included)"))
        rows.append(check(f"{side}/bf16 step time (noisy)", r["step_s"] / ref["step_s"], None,
                          f"{r['step_s']:.2f} s vs {ref['step_s']:.2f} s per step of 4 rows; autocast {r['precision']} vs {ref['precision']}"))
        rows.append(check(f"{side} - bf16 ROUGE-L (points)", 100 * (r["rougeL"] - ref["rougeL"]), ">= -1.0",
                          f"{100 * r['rougeL']:.2f} vs {100 * ref['rougeL']:.2f} on {args.eval_rows} demo rows after {args.steps} steps"))
    print_rows(f"quantized base: {args.model}, LoRA r=8 q/v, {args.steps} steps x 4 demo rows, {device}", rows)
    save("quantized", {"rows": rows, "sides": results, "settings": {**vars(args), "train": train_settings, "bf16": bf16},
                       "load_average_at_start": load_start})


if __name__ == "__main__":
    sys.exit(main())
