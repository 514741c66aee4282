"""The sharded runs of test_sharding.py, started by it under ``torch.distributed.run`` with 2 processes.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_runs.py SETTINGS.json

SETTINGS.json: ``{"root": folder, "lora": TrainConfig fields, "full": TrainConfig fields}``. One launch runs
every sharded training (starting processes costs more than these tiny runs):

    root/lora         LoRA, uninterrupted
    root/interrupted  the same, killed right after its first checkpoint, then resumed from that checkpoint
    root/full         full fine-tuning
"""

from __future__ import annotations

import json
import sys

from peftkit.data import PromptFormat
from peftkit.train import TrainConfig, train
from peftkit.train import loop as loop_module


class Killed(Exception):
    """Stands for the process being killed (by every process at the same step, as a job scheduler does)."""


def config(fields: dict, output: str, **changes) -> TrainConfig:
    fields = {**fields, **changes, "output": output}
    return TrainConfig(**{**fields, "format": PromptFormat(**fields.get("format", {}))})


def main(settings_file: str) -> None:
    settings = json.loads(open(settings_file, encoding="utf-8").read())
    root, lora = settings["root"], settings["lora"]
    train(config(lora, f"{root}/lora"))

    real_save = loop_module.save_checkpoint

    def save_then_die(output, step, *args, **kwargs):
        path = real_save(output, step, *args, **kwargs)
        raise Killed(step)

    loop_module.save_checkpoint = save_then_die
    try:
        train(config(lora, f"{root}/interrupted"))
    except Killed:
        pass
    loop_module.save_checkpoint = real_save
    train(config(lora, f"{root}/interrupted", resume=True))

    train(config(settings["full"], f"{root}/full"))


if __name__ == "__main__":
    main(sys.argv[1])
