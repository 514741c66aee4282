"""Experiments: methods compared on one task (``peftkit compare``) and rank sweeps (``peftkit sweep``).

    from peftkit.experiments import CompareConfig, run_experiment
    from peftkit.train import TrainConfig
    report = run_experiment(CompareConfig(train_data="train.jsonl", eval_data="test.jsonl", output="runs/cmp",
                                          methods=["baseline", "full", "lora"], training=TrainConfig(max_steps=100)))

Every entry is trained with ``peftkit.train.train`` and scored with ``peftkit.evaluate.evaluate`` under
the same budget and settings, in ``OUTPUT/runs/<entry>/``; ``OUTPUT/report.json`` holds one object per
entry (fields in :data:`REPORT_FIELDS`), ``OUTPUT/report.md`` the table, the conclusion and example
predictions, and the PNG plots sit next to them.
"""

from .config import BASELINE, CompareConfig, Entry, ExperimentConfig, SweepConfig, build_experiment_config
from .report import REPORT_FIELDS
from .runner import run_experiment

__all__ = [
    "BASELINE",
    "CompareConfig",
    "Entry",
    "ExperimentConfig",
    "REPORT_FIELDS",
    "SweepConfig",
    "build_experiment_config",
    "run_experiment",
]
