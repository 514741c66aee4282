"""``peftkit eval``: generate predictions for a dataset and score them with ROUGE.

Example:
  peftkit eval --adapter runs/lora --data test.jsonl --limit 100 --output runs/lora/eval

Writes metrics.json (ROUGE-1/2/L/Lsum as fractions in [0, 1], n, settings, timings) and
predictions.jsonl (each prediction with its references). Without --adapter it evaluates the model itself.
"""

from __future__ import annotations

import argparse

from ._args import add_config_arguments, add_config_file_arguments, flags_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..evaluate import EvalConfig

    p = sub.add_parser("eval", help="generate and score predictions (ROUGE)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_file_arguments(p)
    dests = add_config_arguments(p, EvalConfig)
    p.set_defaults(func=run, _dests=dests)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import EvalConfig, evaluate
    from ..options import build

    config = build(EvalConfig, args.config, args.set, **flags_from(args, args._dests))
    metrics = evaluate(config)
    if config.task == "classify":
        print(f"peftkit eval: n={metrics['n']}  accuracy {100 * metrics['accuracy']:.2f}  macro-F1 {100 * metrics['macro_f1']:.2f}")
        print(f"peftkit eval: wrote {config.output}/metrics.json and predictions.jsonl")
        return 0
    scores = "  ".join(f"{k} {100 * metrics[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    print(f"peftkit eval: n={metrics['n']}  {scores}  ({metrics['examples_per_s']:.2f} examples/s)")
    print(f"peftkit eval: wrote {config.output}/metrics.json and predictions.jsonl")
    return 0
