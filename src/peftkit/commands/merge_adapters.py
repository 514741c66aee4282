"""``peftkit merge-adapters``: combine several LoRA adapters of one base model into one multi-task adapter.

Example:
  peftkit merge-adapters --adapter runs/summarize --adapter runs/qa --weights 0.6,0.4 \\
      --combination-type ties --density 0.5 --output runs/summarize+qa

Writes an ordinary adapter (adapter_config.json + adapter_model.safetensors, Hugging Face PEFT format) that
`peftkit eval`, `peftkit serve` and `peft` load like any other. Combination types as in peft's
add_weighted_adapter: cat (exact sum, rank = sum of ranks), svd (exact sum truncated to --svd-rank), linear,
ties, dare_linear, dare_ties, magnitude_prune (the last four keep a --density fraction of each tensor) and the
*_svd forms. The DARE types drop entries at random: --seed makes the result repeatable.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..methods.lora_combine import COMBINATION_TYPES

    p = sub.add_parser("merge-adapters", help="combine LoRA adapters into one (TIES, DARE, SVD, ...)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", action="append", required=True, metavar="DIR",
                   help="an adapter directory (repeat: two or more; one only rescales it)")
    p.add_argument("--weights", required=True, metavar="W,W,...",
                   help="one weight per --adapter, in the same order (negative weights subtract a task)")
    p.add_argument("--output", required=True, help="directory for the combined adapter")
    p.add_argument("--combination-type", default="cat", choices=COMBINATION_TYPES,
                   help="how to combine (default: cat, the exact weighted sum of the updates)")
    p.add_argument("--density", type=float, default=None,
                   help="fraction of each tensor kept by ties, dare_*, magnitude_prune (and their _svd forms)")
    p.add_argument("--majority-sign-method", default="total", choices=["total", "frequency"],
                   help="TIES sign election: sign of the sum (total) or of the count (frequency)")
    p.add_argument("--svd-rank", type=int, default=None, help="rank of the svd types' result (default: the largest rank)")
    p.add_argument("--model", default=None, help="base model (directory, hub id or catalogue name); default: the one "
                   "recorded in the first adapter's adapter_config.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the DARE types' random drops (default: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..evaluate import load_for_inference

    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise ValueError(f"--weights {args.weights!r}: give numbers separated by commas, e.g. 0.6,0.4.") from None
    if len(weights) != len(args.adapter):
        raise ValueError(f"--weights has {len(weights)} numbers for {len(args.adapter)} --adapter directories; give one each.")
    if Path(args.output).exists() and any(Path(args.output).iterdir()):
        raise ValueError(f"--output {args.output} exists and is not empty; choose a new directory.")
    model, tokenizer, _ = load_for_inference(args.model, args.adapter[0], torch.device("cpu"))
    names = [f"adapter{i}" for i in range(len(args.adapter))]
    # load_for_inference names the first adapter "default"; the others get their own names.
    model.load_adapter(args.adapter[0], adapter_name=names[0])
    model.delete_adapter("default")
    for name, path in zip(names[1:], args.adapter[1:]):
        model.load_adapter(path, adapter_name=name)
    torch.manual_seed(args.seed)
    model.add_weighted_adapter(names, weights, "default", combination_type=args.combination_type, density=args.density,
                               majority_sign_method=args.majority_sign_method, svd_rank=args.svd_rank)
    from ..io.files import staged_directory

    with staged_directory(args.output) as staging:  # the combined adapter appears whole, or not at all
        model.save_pretrained(staging, selected_adapters=["default"])
        tokenizer.save_pretrained(staging)
    config = model.peft_config["default"]
    print(f"peftkit merge-adapters: {args.combination_type} of {len(names)} adapters (rank {config.r}) -> {args.output}")
    return 0
