"""Evaluation generation on DialogSum: ``peftkit eval`` vs a plain per-example ``generate`` loop.

* ``plain``: what one writes without peftkit: ``peft.PeftModel.from_pretrained`` (fp32, the model's own
  precision), then ``generate`` once per example.
* ``peftkit``: :func:`peftkit.evaluate.evaluate` (what ``peftkit eval`` runs) with its defaults: batches of 16
  prompts sorted by length, left padding, bf16 where the hardware runs it fast (``precision auto``).
* ``peftkit fp32``: the same with ``precision fp32``, so the gain of batching alone shows.
* ``peft batched``: ``peft`` at its users' best settings for evaluation: the model loaded in bf16 where bf16 is
  fast (``dtype=torch.bfloat16``, fp32 otherwise), the adapter merged in place (``merge_adapter()``), prompts
  sorted by length and generated in left-padded batches of the same size as peftkit's. The comparison that
  counts; the plain loop shows what batching and precision give together.

Same rows (the first ``--rows`` of DialogSum test), same prompt token ids (peftkit's prompt format), same
adapter (LoRA r=8 on q/v with small random weights, seed 0, saved in the Hugging Face PEFT format), greedy,
at most ``--max-new-tokens`` tokens, stopping at the end-of-sequence token. Timed: generation only (model
loading excluded on both sides); medians of ``--repeats`` interleaved runs. Also reported: how many
predictions equal the plain loop's, and ROUGE-L of each (three references per row).

    .venv/bin/python bench/bench_eval.py [--rows 24] [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from common import check, data_name, dialogsum, interleaved, load_average, load_base, median, print_rows, save, set_threads

from peftkit import LoraConfig, get_peft_model
from peftkit.evaluate import EvalConfig, GenerationSettings, evaluate, rouge
from peftkit.precision import bf16_support


def make_adapter(load, directory: str) -> None:
    model = get_peft_model(load(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    model.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="peftkit's generation batch size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name or model directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    set_threads(args.threads)
    load_start = load_average()
    import peft

    from peftkit.data import PromptFormat, load_encoded

    load, tokenizer, model_dir = load_base(args.model)
    device = torch.device(args.device)
    data = str(dialogsum("test"))
    examples, encoded = load_encoded(data, tokenizer, PromptFormat(), seq2seq=False, limit=args.rows)
    references = [e.references for e in examples]
    with tempfile.TemporaryDirectory() as tmp:
        make_adapter(load, f"{tmp}/adapter")
        plain_model = peft.PeftModel.from_pretrained(load(), f"{tmp}/adapter").to(device).eval()
        peer_dtype = torch.bfloat16 if bf16_support(device)[0] else torch.float32
        peer_model = peft.PeftModel.from_pretrained(load().to(peer_dtype), f"{tmp}/adapter").to(device).eval()
        peer_model.merge_adapter()
        peer_precision = "bf16 weights" if peer_dtype == torch.bfloat16 else "fp32"

        @torch.no_grad()
        def peer_batched() -> list[str]:
            from peftkit.data.batching import collate_prompts, sorted_batches

            out: dict[int, str] = {}
            lengths = [e.prompt_length for e in encoded.items]
            for rows in sorted_batches(lengths, args.batch_size):
                batch = collate_prompts([encoded.items[i] for i in rows], tokenizer.pad_token_id, "left")
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                generated = peer_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False,
                                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
                for row, i in enumerate(rows):
                    out[i] = tokenizer.decode(generated[row, ids.shape[1]:], skip_special_tokens=True).strip()
            return [out[i] for i in range(len(encoded.items))]

        @torch.no_grad()
        def plain() -> list[str]:
            out = []
            for e in encoded.items:
                ids = torch.tensor([e.prompt_ids], device=device)
                generated = plain_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                                 do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
                out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip())
            return out

        def peftkit(precision: str) -> tuple[list[str], float]:
            settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, precision=precision)
            cfg = EvalConfig(model=str(model_dir), adapter=f"{tmp}/adapter", data=data, limit=args.rows,
                             output=f"{tmp}/eval-{precision}", generation=settings, cpu=device.type == "cpu")
            metrics = evaluate(cfg, progress=False)
            lines = (f"{tmp}/eval-{precision}/predictions.jsonl")
            import json

            predictions = [json.loads(line)["prediction"] for line in open(lines, encoding="utf-8")]
            return predictions, metrics["generation_s"]

        plain_model.generate(input_ids=torch.tensor([encoded.items[0].prompt_ids[:16]], device=device), max_new_tokens=2)  # warm up
        outputs: dict[str, list[str]] = {}
        seconds: dict[str, list[float]] = {"plain": [], "peft_batched": [], "peftkit": [], "peftkit_fp32": []}

        def timed(name, fn):
            start = time.perf_counter()
            outputs[name] = fn()
            seconds[name].append(time.perf_counter() - start)

        def timed_peftkit(name, precision):
            outputs[name], s = peftkit(precision)
            seconds[name].append(s)  # generation only, as evaluate() measures it

        interleaved({"plain": lambda: timed("plain", plain), "peft_batched": lambda: timed("peft_batched", peer_batched), "peftkit": lambda: timed_peftkit("peftkit", "auto"),
                     "peftkit_fp32": lambda: timed_peftkit("peftkit_fp32", "fp32")}, repeats=args.repeats, warmup=0)
    med = {k: median(v) for k, v in seconds.items()}
    scores = {k: rouge(v, references) for k, v in outputs.items()}
    equal = {k: sum(a == b for a, b in zip(outputs[k], outputs["plain"])) for k in ("peftkit", "peftkit_fp32")}
    precision = "bf16" if bf16_support(device)[0] else "fp32"
    equal["peft_batched"] = sum(a == b for a, b in zip(outputs["peft_batched"], outputs["plain"]))
    peer = f"peft [{peer_precision}, merged, batches of {args.batch_size} sorted by length, left padding]"
    rows = [
        check(f"eval generation throughput, peftkit eval ({precision}, default) / peft batched ({peer_precision}, merged)",
              med["peft_batched"] / med["peftkit"], ">= 1.00",
              f"{args.rows / med['peftkit']:.2f} vs {args.rows / med['peft_batched']:.2f} examples/s; peftkit [{'bf16 autocast over bf16 linear weights' if precision == 'bf16' else 'fp32'}"
              f", adapter folded, batches of {args.batch_size}] vs {peer}; ROUGE-L "
              f"{100 * scores['peftkit']['rougeL']:.2f} vs {100 * scores['peft_batched']['rougeL']:.2f}"),
        check(f"eval generation throughput, peftkit eval ({precision}, default) / plain loop (fp32)", med["plain"] / med["peftkit"], ">= 2.0",
              f"{args.rows / med['peftkit']:.2f} vs {args.rows / med['plain']:.2f} examples/s; "
              f"{equal['peftkit']}/{args.rows} predictions equal; ROUGE-L {100 * scores['peftkit']['rougeL']:.2f} vs "
              f"{100 * scores['plain']['rougeL']:.2f}"),
        check("eval generation throughput, peftkit eval fp32 / plain loop (fp32)", med["plain"] / med["peftkit_fp32"], ">= 2.0",
              f"{args.rows / med['peftkit_fp32']:.2f} examples/s; {equal['peftkit_fp32']}/{args.rows} predictions equal; "
              f"ROUGE-L {100 * scores['peftkit_fp32']['rougeL']:.2f}"),
    ]
    rows[1]["detail"] += "; the plain loop: peft, fp32, one example at a time (what batching and precision give together)"
    print_rows(f"eval generation: SmolLM2-135M + LoRA, {args.rows} {data_name()} test rows, greedy, <= {args.max_new_tokens} new tokens", rows)
    save("eval", {"rows": rows, "median_s": med, "seconds": seconds, "rouge": scores, "equal_to_plain": equal,
                  "predictions": outputs, "settings": vars(args), "load_average_at_start": load_start})


if __name__ == "__main__":
    sys.exit(main())
