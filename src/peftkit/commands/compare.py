"""``peftkit compare``: methods side by side on one task, under one training budget, with a report.

Example:
  peftkit compare --train-data train.jsonl --eval-data test.jsonl --methods baseline,full,lora,ia3 \\
      --max-steps 200 --batch-size 8 --eval-limit 100 --max-new-tokens 64 --output runs/compare

`baseline` is the frozen model, zero-shot. Every other method trains on the same rows with the same
steps, batch and seed (each at its own default learning rate unless --lr or --per-method METHOD.lr=X
says otherwise) and is scored on the same rows with the same generation settings. Each entry runs in
OUTPUT/runs/NAME; running the command again reuses entries that finished with the same settings, so a
comparison can be resumed or extended with another method. Writes OUTPUT/report.json, report.md and
PNG plots (quality against trainable parameters; memory, time, stored size and latency per method).
"""

from __future__ import annotations

import argparse

from ._args import add_config_arguments, add_config_file_arguments, flags_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..experiments import CompareConfig
    from ..registry import presets

    p = sub.add_parser("compare", help="compare methods on one task: ROUGE, parameters, memory, time, size, latency",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_file_arguments(p)
    listing = ", ".join(f"{name} (lr {preset.default_lr:g})" for name, preset in presets().items())
    dests = add_config_arguments(p, CompareConfig, extra_help={"methods": f" Methods and their default learning rates: {listing}."},
                                 metavars={"per_method": "NAME.KEY=VALUE,...", "methods": "NAME[=METHOD],..."})
    p.set_defaults(func=run, _dests=dests)


def run(args: argparse.Namespace) -> int:
    from ..experiments import CompareConfig, build_experiment_config, run_experiment

    config = build_experiment_config(CompareConfig, args.config, args.set, **flags_from(args, args._dests))
    return finish(run_experiment(config, kind="compare"), config.output)


def finish(report: dict, output: str) -> int:
    """Print the table, the conclusion and where the files are; exit 1 if an entry failed."""
    from ..experiments.report import rank_choice_sentence, table

    print()
    print(table(report["methods"]))
    print()
    print(report["conclusion"])
    print()
    if report.get("rank_choice"):
        print(rank_choice_sentence(report["rank_choice"]))
        print()
    print(f"report: {output}/report.md (table, conclusion, example predictions) and {output}/report.json")
    for plot in report.get("plots", []):
        print(f"plot:   {output}/{plot}")
    return 0 if all(m["status"] == "ok" for m in report["methods"]) else 1
