"""End-to-end LoRA fine-tune on DialogSum: ``peftkit train`` vs the two pipelines its users would otherwise run.

* ``peftkit``: ``peftkit train`` with its defaults (bf16 autocast where the CPU/GPU runs it fast, logits and
  loss only at target positions, length-grouped batches), in a process of its own.
* ``Trainer+peft``: ``transformers.Trainer`` + ``peft`` at the settings a user on this hardware would choose:
  ``bf16=True`` where bf16 is fast, ``train_sampling_strategy="group_by_length"`` (batches of similar length, so
  ``DataCollatorForSeq2Seq``'s dynamic padding pads little), in a process of its own (``--worker trainer``).
* ``TRL SFTTrainer``: ``trl.SFTTrainer`` with ``peft_config`` (the LoRA below), ``bf16=True`` where bf16 is fast,
  padding-free batches (``padding_free=True``: the 4 examples of a step flattened into one row, position ids
  restarting at each example; transformers confines attention to each example from those position ids, also
  with SDPA on a CPU), TRL's fused LM head, gradient checkpointing off (TRL turns it on by default; it trades
  speed for memory). Not ``packing=True``: TRL's best-fit packing puts examples into rows of ``max_length``
  tokens, which changes how many examples each optimizer step sees, so the runs would no longer take the same
  steps on the same rows (``--worker trl``).

``peftkit train`` compiles its transformer blocks by default on a long enough bf16 run on a CPU
(:func:`peftkit.train.compile.auto_compile`: from 100k training tokens; 128 rows are not, 500 are). Optional
(``--peers trainer-compile``, ``--ours peftkit,peftkit-eager,peftkit-warm``): ``Trainer`` + ``peft`` with
``torch_compile=True`` (the whole model compiled by Inductor), ``peftkit train --no-compile``, and ``peftkit
train`` as on a second run on the machine (``peftkit-warm``: an untimed 2-step run fills its Inductor cache
first). Every other pipeline that may compile starts from an empty Inductor cache and temporary directory of its
own, so its training time includes all of its compiling, as on a first run.

All of them see the same rows (the first ``--examples`` of DialogSum dev), the same token ids (peftkit's prompt
format: chat template, prompt masked out of the labels), the same LoRA (r=8, alpha 16, no dropout, q/v) and
the same optimisation (AdamW, lr 2e-4, batch 4, cosine schedule with 5% warmup, clipping at 1.0, one epoch),
and each saves an adapter in the Hugging Face PEFT format. Measured: wall time of the whole command (model
load, tokenization, training, saving), training tokens/s (the rows' real tokens, padding excluded, over each
pipeline's own training time), and the held-out loss of each adapter on the same rows (the first ``--heldout``
rows of DialogSum test, reference ``summary1``), computed by this script the same way for all (fp32, mean token
cross-entropy). Each ratio is printed with the settings each side actually ran (read back from the trainer
after training, not assumed). With ``--repeats`` > 1 the pipelines alternate and medians are reported.

    .venv/bin/python bench/bench_finetune.py [--examples 128] [--repeats 1] [--peers trainer,trl] [--ours peftkit]
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import check, data_name, dialogsum, load_average, load_base, median, print_rows, save, set_threads

LR, BATCH, RANK, ALPHA, WARMUP = 2e-4, 4, 8, 16, 0.05
PEERS = {"trainer": "Trainer+peft", "trl": "TRL SFTTrainer", "trainer-compile": "Trainer+peft compiled"}
OURS = {"peftkit": "peftkit train", "peftkit-eager": "peftkit train --no-compile", "peftkit-warm": "peftkit train, 2nd run"}


def encoded_rows(tokenizer, split: str, limit: int, target_field: str = "summary"):
    from peftkit.data import PromptFormat, encode_examples, read_examples

    examples = read_examples(str(dialogsum(split)), "dialogue", target_field, limit=limit)
    return encode_examples(examples, tokenizer, PromptFormat(), seq2seq=False).items


def describe(settings: dict) -> str:
    """One line of what a pipeline ran, e.g. ``bf16, group_by_length, dynamic padding``."""
    parts = [settings["precision"], settings["sampling"], settings["batches"]]
    parts += [f"{k}={v}" for k, v in settings.items() if k not in ("precision", "sampling", "batches")]
    return ", ".join(str(p) for p in parts)


def peer_worker(kind: str, output: str, examples: int, seed: int, model_name: str) -> None:
    """One peer pipeline at its users' best settings on this hardware. Prints a JSON line with what ran."""
    started = time.perf_counter()
    import peft
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from peftkit.precision import bf16_support

    load, tokenizer, _ = load_base(model_name)
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    items = encoded_rows(tokenizer, "dev", examples)
    steps = math.ceil(len(items) / BATCH)
    cpu = not torch.cuda.is_available()
    bf16 = bf16_support(torch.device("cpu" if cpu else "cuda"))[0]  # what a user would switch on here
    common = dict(
        output_dir=output, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR, weight_decay=0.0,
        lr_scheduler_type="cosine", warmup_steps=math.ceil(WARMUP * steps), max_grad_norm=1.0, logging_steps=10,
        save_strategy="no", report_to=[], seed=seed, use_cpu=cpu, bf16=bf16, fp16=False, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if kind in ("trainer", "trainer-compile"):
        model = peft.get_peft_model(load(), lora)
        dataset = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in items]
        args = TrainingArguments(**common, train_sampling_strategy="group_by_length", torch_compile=kind == "trainer-compile")
        collator = DataCollatorForSeq2Seq(tokenizer, model=model, padding=True, label_pad_token_id=-100)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        batches = "dynamic padding (DataCollatorForSeq2Seq)"
    else:
        import datasets
        from trl import SFTConfig, SFTTrainer

        dataset = datasets.Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in items])
        args = SFTConfig(**common, padding_free=True, packing=False, max_length=None, gradient_checkpointing=False)
        trainer = SFTTrainer(model=load(), args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
        model = trainer.model
        batches = "padding-free (one flattened row per step)" if trainer.padding_free else "dynamic padding"
    result = trainer.train()
    model.save_pretrained(output)
    mixed = trainer.accelerator.mixed_precision  # what autocast actually ran: "bf16" or "no"
    settings = {"precision": "fp32" if mixed == "no" else f"{mixed} autocast", "sampling": args.train_sampling_strategy,
                "batches": batches}
    if kind == "trl":
        settings["gradient_checkpointing"] = args.gradient_checkpointing
    if args.torch_compile:
        settings["compile"] = f"torch_compile (whole model, {args.torch_compile_backend or 'inductor'}, cold cache)"
    tokens = sum(len(e.input_ids) for e in items)
    print(json.dumps({"train_time_s": result.metrics["train_runtime"], "tokens": tokens, "steps": trainer.state.global_step,
                      "final_loss": result.metrics.get("train_loss"), "inner_wall_s": time.perf_counter() - started,
                      "settings": settings}))


def cold_compile_cache() -> dict:
    """Environment for a pipeline that compiles: a fresh, empty Inductor cache, so that no run reuses code
    compiled by an earlier one (each compiled pipeline pays its whole compile time, as on a first run). A fresh
    TMPDIR too: Inductor keeps its precompiled C++ headers under the temporary directory whatever
    TORCHINDUCTOR_CACHE_DIR says."""
    return {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="bench-inductor-"), "TMPDIR": tempfile.mkdtemp(prefix="bench-tmp-")}


def train_args(output: str, examples: int, seed: int, model_name: str) -> list[str]:
    """``peftkit train``'s arguments for the same rows, LoRA and optimisation as the peers (after ``peftkit``)."""
    return ["train", "--model", model_name, "--data", str(dialogsum("dev")), "--limit", str(examples),
            "--output", output, "--method", "lora", "--r", str(RANK), "--lora-alpha", str(ALPHA), "--lora-dropout", "0",
            "--target-modules", "q_proj,v_proj", "--lr", str(LR), "--batch-size", str(BATCH), "--epochs", "1",
            "--warmup", str(WARMUP), "--schedule", "cosine", "--max-grad-norm", "1.0", "--seed", str(seed), "--log-every", "10"]


def run_peftkit(output: str, examples: int, seed: int, model_name: str, kind: str = "peftkit") -> dict:
    def command(folder: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "peftkit.cli", *train_args(folder, examples, seed, model_name), *extra]

    cmd = command(output, *(["--no-compile"] if kind == "peftkit-eager" else []))
    env = {**os.environ, "TQDM_DISABLE": "1", **cold_compile_cache()}  # by default it may compile
    if kind == "peftkit-warm":  # a second run on this machine: an earlier one (untimed, 2 steps) filled the cache
        warm = subprocess.run(command(output + "-warmup", "--max-steps", "2", "--compile"), capture_output=True, text=True, check=False, env=env)
        if warm.returncode != 0:
            raise RuntimeError(f"peftkit train (cache warm-up) failed:\n{warm.stderr[-3000:]}")
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"peftkit train failed:\n{out.stderr[-3000:]}")
    run = json.loads((Path(output) / "run.json").read_text())
    log = [json.loads(line) for line in (Path(output) / "train_log.jsonl").read_text().splitlines() if line.strip()]
    config = run.get("config", {})
    settings = {"precision": "bf16 autocast" if run["precision"] == "bf16" else "fp32",
                "sampling": "group_by_length" if config.get("group_by_length", True) else "random",
                "batches": "packed (padding-free)" if config.get("packing") else "dynamic padding"}
    if config.get("compile"):
        settings["compile"] = f"regional torch.compile (inductor, {'warm cache' if kind == 'peftkit-warm' else 'cold cache'})"
    return {"wall_s": wall, "train_time_s": run["train_time_s"], "steps": run["steps"], "device": run.get("device"),
            "final_loss": run["final_loss"], "settings": settings,
            "own_tokens_count": round(run["train_tokens_per_s"] * run["train_time_s"]),
            # tokens/s of each logged interval: a slow first interval is start-up, a slow steady state is the loop
            "interval_tokens_per_s": [round(r["tokens_per_s"]) for r in log if "tokens_per_s" in r]}


def run_peer(kind: str, output: str, examples: int, seed: int, model_name: str) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--worker-output", output, "--examples", str(examples),
                          "--seed", str(seed), "--model", model_name], capture_output=True, text=True, check=False,
                         env={**os.environ, **(cold_compile_cache() if kind.endswith("-compile") else {})})
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"{PEERS[kind]} pipeline failed:\n{out.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(out.stdout.strip().splitlines()[-1])}


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
    parser.add_argument("--peers", default=None,
                        help=f"comma-separated subset of {','.join(PEERS)} (default: trainer,trl; trl where trl and datasets "
                             "are installed; trainer-compile: Trainer's torch_compile=True, which compiles the whole model)")
    parser.add_argument("--ours", default="peftkit",
                        help=f"comma-separated subset of {','.join(OURS)}: peftkit's pipelines (default: peftkit)")
    parser.add_argument("--concurrent", action="store_true",
                        help="run the pipelines of each repetition at the same time, one per core (needs a core per "
                             "pipeline and --threads 1): on a shared or virtual machine whose speed drifts by tens of "
                             "percent from minute to minute, a drift then hits every pipeline alike. A pipeline that "
                             "finishes first leaves the others the machine to themselves, which favours the slower ones")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name or model directory")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every pipeline (default: one per core)")
    parser.add_argument("--worker", choices=list(PEERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.worker:
        return peer_worker(args.worker, args.worker_output, args.examples, args.seed, args.model)
    if args.peers is None:
        import importlib.util

        missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
        args.peers = "trainer" if missing else "trainer,trl"
        if missing:  # e.g. gpu.sh on a machine with only the wheels it carries
            print(f"bench_finetune: TRL SFTTrainer not run: {' and '.join(missing)} not installed (pip install trl datasets)")
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown or not peers:
        parser.error(f"--peers takes a comma-separated subset of {','.join(PEERS)}, got {args.peers!r}")
    ours_names = [p for p in args.ours.split(",") if p]
    if not ours_names or set(ours_names) - set(OURS):
        parser.error(f"--ours takes a comma-separated subset of {','.join(OURS)}, got {args.ours!r}")
    if args.concurrent and (args.threads != 1 or len(peers) + len(ours_names) > (os.cpu_count() or 1)):
        parser.error(f"--concurrent runs one pipeline per core with --threads 1: {len(peers) + len(ours_names)} pipelines, "
                     f"{os.cpu_count()} cores, --threads {args.threads}")
    load_start = load_average()
    _, tokenizer, _ = load_base(args.model)
    tokens = sum(len(e.input_ids) for e in encoded_rows(tokenizer, "dev", args.examples))  # the same rows for all
    runs: dict[str, list[dict]] = {name: [] for name in (*peers, *ours_names)}
    if args.concurrent:  # one core per pipeline: torch.compile's C++ compiles too
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            def pipeline(name: str, i: int = i) -> tuple[str, dict]:
                out = f"{tmp}/{name}{i}"
                if name in OURS:
                    result = run_peftkit(out, args.examples, args.seed, args.model, kind=name)
                else:
                    result = run_peer(name, out, args.examples, args.seed, args.model)
                return out, {**result, "load": load_average()}

            if args.concurrent:  # all pipelines of this repeat at once, one core each
                with ThreadPoolExecutor(len(runs)) as pool:
                    done = dict(zip(runs, pool.map(pipeline, runs)))
            else:
                done = {name: pipeline(name) for name in runs}
            for name, (out, result) in done.items():
                result["heldout_loss"] = heldout_loss(out, args.heldout, args.model)
                result["tokens"] = tokens
                result["tokens_per_s"] = tokens / result["train_time_s"]
                result["concurrent"] = args.concurrent
                runs[name].append(result)
                print(f"  {name} run {i + 1}: {json.dumps(result)}", flush=True)
    med = {name: {k: median([r[k] for r in rs]) for k in ("wall_s", "train_time_s", "tokens_per_s", "heldout_loss")}
           for name, rs in runs.items()}
    settings = {name: describe(rs[0]["settings"]) for name, rs in runs.items()}
    with tempfile.TemporaryDirectory() as tmp:  # the untrained model's held-out loss, for scale
        import peft

        load, _, _ = load_base(args.model)
        peft.get_peft_model(load(), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp)
        base_loss = heldout_loss(tmp, args.heldout, args.model)
    rows = []
    how = ("side by side, one core each, " if args.concurrent else "") + (f"medians of {args.repeats} runs; " if args.repeats > 1 else "")
    for name in ours_names:
        ours, mine = med[name], OURS[name]
        for peer in peers:
            ref, label = med[peer], PEERS[peer]
            vs = f"{how}{mine} [{settings[name]}] vs {label} [{settings[peer]}]"
            rows += [
                check(f"end-to-end fine-tune wall time, {mine} / {label}", ours["wall_s"] / ref["wall_s"], None,
                      f"{ours['wall_s']:.1f} s vs {ref['wall_s']:.1f} s; {vs}"),
                check(f"fine-tune training tokens/s, {mine} / {label}", ours["tokens_per_s"] / ref["tokens_per_s"], ">= 1.50",
                      f"{ours['tokens_per_s']:.0f} vs {ref['tokens_per_s']:.0f} tokens/s; {vs}"),
                check(f"held-out loss, {mine} - {label} (not worse: <= 0)", ours["heldout_loss"] - ref["heldout_loss"], "<= 0.00",
                      f"{ours['heldout_loss']:.4f} vs {ref['heldout_loss']:.4f} (untrained: {base_loss:.4f}; {args.heldout} test rows)"),
            ]
    print_rows(f"end-to-end fine-tune: SmolLM2-135M, LoRA r=8 q/v, {args.examples} {data_name()} rows, batch {BATCH}, "
               f"{tokens} tokens", rows)
    save("finetune", {"rows": rows, "median": med, "runs": runs, "peer_settings": settings, "untrained_heldout_loss": base_loss,
                      "settings": vars(args), "load_average_at_start": load_start})


if __name__ == "__main__":
    sys.exit(main())
