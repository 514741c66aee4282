"""``peftkit eval``: generate predictions for a dataset and score them (ROUGE by default).

Example:
  peftkit eval --adapter runs/lora --data test.jsonl --limit 100 --output runs/lora/eval
  peftkit eval --adapter runs/qa --data qa.jsonl --metrics exact_match,token_f1,loss --output runs/qa/eval

Writes metrics.json (each metric as a fraction in [0, 1], n, settings, timings) and predictions.jsonl
(each prediction with its references and per-row scores). Without --adapter it evaluates the model itself.

Several references per example (DialogSum's test split has three) are scored three ways, all written to
metrics.json as KEY_max, KEY_mean and KEY_first; --reference-mode picks the headline:
  max    each example keeps its best reference (the DialogSum paper; SQuAD; sacrebleu's multi-reference
         BLEU/chrF)
  mean   each reference scored as its own row, then averaged (the course lab's DialogSum figures)
  first  the first reference only
They differ by several ROUGE points: compare with a published number only under the protocol it used.
"""

from __future__ import annotations

import argparse

from ._args import add_config_arguments, add_config_file_arguments, flags_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..evaluate import EvalConfig

    p = sub.add_parser("eval", help="generate and score predictions (ROUGE, exact match, BLEU, ...)", description=__doc__,
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
    from ..evaluate import metric_keys

    scores = "  ".join(f"{k} {metrics[k]:.4g}" if k in ("loss", "perplexity") else f"{k} {100 * metrics[k]:.2f}"
                       for k in metric_keys(config.scoring.metrics))
    print(f"peftkit eval: n={metrics['n']}  {scores}  (reference mode {metrics['reference_mode']}; "
          f"{metrics['examples_per_s']:.2f} examples/s)")
    print(f"peftkit eval: wrote {config.output}/metrics.json and predictions.jsonl")
    return 0
