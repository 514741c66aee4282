"""``peftkit sweep``: LoRA (or DoRA) at several ranks, and optionally several target-module sets.

Example:
  peftkit sweep --train-data train.jsonl --eval-data test.jsonl --ranks 4,8,16,32,64 \\
      --target-module-sets q_proj+v_proj,all-linear --max-steps 200 --eval-limit 100 --output runs/sweep

The same report as `peftkit compare` (with the zero-shot baseline unless --no-baseline), plus
rank_sweep.png: ROUGE, trainable parameters and forgetting against rank. Entries are named
METHOD-rRANK[-MODULES]. With --auto it also names the smallest rank whose ROUGE-L is within --tolerance
points of the best, and what it saves (parameters, bytes per task, training time).
"""

from __future__ import annotations

import argparse

from ._args import add_config_arguments, add_config_file_arguments, flags_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..experiments import SweepConfig

    p = sub.add_parser("sweep", help="LoRA at several ranks (and module sets): the compare report plus ROUGE vs rank",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_file_arguments(p)
    dests = add_config_arguments(p, SweepConfig, skip={"r", "rank"})
    p.set_defaults(func=run, _dests=dests)


def run(args: argparse.Namespace) -> int:
    from ..experiments import SweepConfig, build_experiment_config, run_experiment
    from .compare import finish

    config = build_experiment_config(SweepConfig, args.config, args.set, **flags_from(args, args._dests))
    return finish(run_experiment(config, kind="sweep"), config.output)
