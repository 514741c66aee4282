"""End-to-end LoRA fine-tune on DialogSum: ``peftkit train`` vs the standard reference pipeline.

* ``peftkit``: ``peftkit train`` with its defaults (bf16 autocast where the CPU/GPU runs it fast, logits and
  loss only at target positions, length-grouped batches), in a process of its own.
* ``reference``: ``transformers.Trainer`` + ``peft`` in fp32 with ``DataCollatorForSeq2Seq`` (dynamic padding,
  -100 label padding), the usual recipe, in a process of its own (``--worker reference``).

Both see the same rows (the first ``--examples`` of DialogSum dev), the same token ids (peftkit's prompt
format: chat template, prompt masked out of the labels), the same LoRA (r=8, alpha 16, no dropout, q/v) and
the same optimisation (AdamW, lr 2e-4, batch 4, cosine schedule with 5% warmup, clipping at 1.0, one epoch),
and both save an adapter in the Hugging Face PEFT format. Measured: wall time of the whole command (model
load, tokenization, training, saving), training tokens/s (real tokens, padding excluded), and the held-out
loss of each adapter on the same rows (the first ``--heldout`` rows of DialogSum test, reference
``summary1``), computed by this script the same way for both (fp32, mean token cross-entropy). With
``--repeats`` > 1 the two alternate and medians are reported.

    .venv/bin/python bench/bench_finetune.py [--examples 128] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import check, data_name, dialogsum, load_average, load_base, median, print_rows, save, set_threads

LR, BATCH, RANK, ALPHA, WARMUP = 2e-4, 4, 8, 16, 0.05


def encoded_rows(tokenizer, split: str, limit: int, target_field: str = "summary"):
    from peftkit.data import PromptFormat, encode_examples, read_examples

    examples = read_examples(str(dialogsum(split)), "dialogue", target_field, limit=limit)
    return encode_examples(examples, tokenizer, PromptFormat(), seq2seq=False).items


def reference_worker(output: str, examples: int, seed: int, model_name: str) -> None:
    """The standard recipe: Trainer + peft, fp32, DataCollatorForSeq2Seq. Prints a JSON line."""
    started = time.perf_counter()
    import peft
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    load, tokenizer, _ = load_base(model_name)
    model = peft.get_peft_model(load(), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                        target_modules=["q_proj", "v_proj"]))
    items = encoded_rows(tokenizer, "dev", examples)
    dataset = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in items]
    steps = math.ceil(len(dataset) / BATCH)
    args = TrainingArguments(
        output_dir=output, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR, weight_decay=0.0,
        lr_scheduler_type="cosine", warmup_steps=math.ceil(WARMUP * steps), max_grad_norm=1.0, logging_steps=10,
        save_strategy="no", report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    result = trainer.train()
    model.save_pretrained(output)
    tokens = sum(len(e.input_ids) for e in items)
    print(json.dumps({"train_time_s": result.metrics["train_runtime"], "tokens": tokens, "steps": steps,
                      "final_loss": result.metrics.get("train_loss"), "inner_wall_s": time.perf_counter() - started}))


def run_peftkit(output: str, examples: int, seed: int, model_name: str) -> dict:
    cmd = [sys.executable, "-m", "peftkit.cli", "train", "--model", model_name, "--data", str(dialogsum("dev")), "--limit", str(examples),
           "--output", output, "--method", "lora", "--r", str(RANK), "--lora-alpha", str(ALPHA), "--lora-dropout", "0",
           "--target-modules", "q_proj,v_proj", "--lr", str(LR), "--batch-size", str(BATCH), "--epochs", "1",
           "--warmup", str(WARMUP), "--schedule", "cosine", "--max-grad-norm", "1.0", "--seed", str(seed), "--log-every", "10"]
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"peftkit train failed:\n{out.stderr[-3000:]}")
    run = json.loads((Path(output) / "run.json").read_text())
    tokens = run["train_tokens_per_s"] * run["train_time_s"]
    log = [json.loads(line) for line in (Path(output) / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return {"wall_s": wall, "train_time_s": run["train_time_s"], "tokens": round(tokens), "steps": run["steps"],
            "precision": run["precision"], "device": run.get("device"), "final_loss": run["final_loss"],
            # tokens/s of each logged interval: a slow first interval is start-up, a slow steady state is the loop
            "interval_tokens_per_s": [round(r["tokens_per_s"]) for r in log if "tokens_per_s" in r]}


def run_reference(output: str, examples: int, seed: int, model_name: str) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--worker", "reference", "--worker-output", output, "--examples", str(examples),
                          "--seed", str(seed), "--model", model_name], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"reference pipeline failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "precision": "fp32", **result}


@torch.no_grad()
def heldout_loss(adapter_dir: str, rows: int, model_name: str) -> float:
    """Mean token cross-entropy of base + adapter on the held-out rows, fp32, one row at a time (no padding)."""
    import peft

    load, tokenizer, _ = load_base(model_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = peft.PeftModel.from_pretrained(load(), adapter_dir).to(device).eval()
    total, count = 0.0, 0
    for e in encoded_rows(tokenizer, "test", rows):  # DialogSum test: summary1 (of 3) is the target
        ids, labels = torch.tensor([e.input_ids], device=device), torch.tensor([e.labels], device=device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        targets = labels[0, 1:]
        keep = targets != -100
        total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=128, help="training rows (one epoch of batch 4)")
    parser.add_argument("--heldout", type=int, default=32, help="held-out rows for the loss")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each pipeline, alternating")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name or model directory")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in both pipelines (default: one per core)")
    parser.add_argument("--worker", choices=["reference"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.worker:
        return reference_worker(args.worker_output, args.examples, args.seed, args.model)
    load_start = load_average()
    runs: dict[str, list[dict]] = {"peftkit": [], "reference": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, fn in (("reference", run_reference), ("peftkit", run_peftkit)):
                out = f"{tmp}/{name}{i}"
                result = fn(out, args.examples, args.seed, args.model)
                result["heldout_loss"] = heldout_loss(out, args.heldout, args.model)
                result["tokens_per_s"] = result["tokens"] / result["train_time_s"]
                result["load"] = load_average()
                runs[name].append(result)
                print(f"  {name} run {i + 1}: {json.dumps(result)}", flush=True)
    med = {name: {k: median([r[k] for r in rs]) for k in ("wall_s", "train_time_s", "tokens_per_s", "heldout_loss")}
           for name, rs in runs.items()}
    ours, ref = med["peftkit"], med["reference"]
    base_loss = None
    with tempfile.TemporaryDirectory() as tmp:  # the untrained model's held-out loss, for scale
        import peft

        load, _, _ = load_base(args.model)
        peft.get_peft_model(load(), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp)
        base_loss = heldout_loss(tmp, args.heldout, args.model)
    rows = [
        check("end-to-end fine-tune wall time, peftkit train / Trainer+peft", ours["wall_s"] / ref["wall_s"], "<= 0.50",
              f"{ours['wall_s']:.1f} s vs {ref['wall_s']:.1f} s ({args.examples} examples, {runs['peftkit'][0]['precision']} vs fp32)"),
        check("fine-tune training tokens/s, peftkit / Trainer+peft", ours["tokens_per_s"] / ref["tokens_per_s"], None,
              f"{ours['tokens_per_s']:.0f} vs {ref['tokens_per_s']:.0f} tokens/s"),
        check("held-out loss, peftkit - Trainer+peft (not worse: <= 0)", ours["heldout_loss"] - ref["heldout_loss"], "<= 0.00",
              f"{ours['heldout_loss']:.4f} vs {ref['heldout_loss']:.4f} (untrained: {base_loss:.4f}; {args.heldout} test rows)"),
    ]
    print_rows(f"end-to-end fine-tune: SmolLM2-135M, LoRA r=8 q/v, {args.examples} {data_name()} rows, batch {BATCH}", rows)
    save("finetune", {"rows": rows, "median": med, "runs": runs, "untrained_heldout_loss": base_loss,
                      "settings": vars(args), "load_average_at_start": load_start})


if __name__ == "__main__":
    sys.exit(main())
