"""``peftkit train``: fine-tune a model on your data with any PEFT method.

Example:
  peftkit train --data train.jsonl --output runs/lora --method lora --r 16 --max-steps 200

Writes the adapter (Hugging Face PEFT format: adapter_config.json + adapter_model.safetensors) and the
tokenizer to --output, or a complete model for methods that train the base weights (full fine-tuning),
plus train_log.jsonl and run.json. Several processes (DDP): torchrun --nproc_per_node 2 -m peftkit.cli train ...
(on GPUs also accelerate launch --multi_gpu --num_processes N -m peftkit.cli train ...). Sharded (FSDP2): add
--sharding fsdp, or accelerate launch --config_file configs/accelerate/fsdp.yaml -m peftkit.cli train ...
"""

from __future__ import annotations

import argparse
import sys

from ._args import add_config_arguments, add_config_file_arguments, flags_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..registry import presets
    from ..train import TrainConfig

    p = sub.add_parser("train", help="fine-tune a model on a dataset (any method)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_file_arguments(p)
    methods = presets()
    listing = "; ".join(f"{name}: {preset.help} (default lr {preset.default_lr:g})" for name, preset in methods.items())
    dests = add_config_arguments(p, TrainConfig, choices={"method": list(methods)}, extra_help={"method": f" Methods: {listing}."})
    p.set_defaults(func=run, _dests=dests)


def run(args: argparse.Namespace) -> int:
    from ..train import TrainingDiverged, build_train_config, train

    config = build_train_config(args.config, args.set, **flags_from(args, args._dests))
    try:
        train(config)
    except TrainingDiverged as e:
        print(f"peftkit train: error: {e}", file=sys.stderr)
        return 1
    return 0
