"""``peftkit merge``: fold an adapter into its base model and save the result as an ordinary model.

Example:
  peftkit merge --adapter runs/lora --output runs/lora-merged

The merged model has the base model's size and speed (no adapter at inference) and loads with plain
transformers: AutoModelForCausalLM.from_pretrained("runs/lora-merged").
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base model", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model (directory, hub id or catalogue name); default: the one "
                   "recorded in the adapter's adapter_config.json")
    p.add_argument("--adapter", required=True, help="adapter directory (Hugging Face PEFT format)")
    p.add_argument("--output", required=True, help="directory for the merged model and its tokenizer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..evaluate import load_for_inference

    model, tokenizer, _ = load_for_inference(args.model, args.adapter, torch.device("cpu"))
    merged = model.merge_and_unload()
    merged.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"peftkit merge: wrote {type(merged).__name__} to {args.output}")
    return 0
