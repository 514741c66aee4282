"""One test config per registered method, used by the contract tests over every method.

A method file that registers a method adds its case here: ``CASES[name] = Case(build=..., ...)``.
``build(arch)`` returns the config to test on a tiny model of ``arch`` (or ``None`` when the method does
not apply there, e.g. BitFit on a model without biases). The contract test fails if a registered
``peft_type`` has no case, so no method escapes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from peftkit import BottleneckConfig, LoraConfig
from peftkit.config import PeftConfig


@dataclass
class Case:
    build: Callable[[str], PeftConfig | None]
    noop_at_init: bool  # a fresh adapter leaves outputs unchanged
    peft_type: str


CASES: dict[str, Case] = {
    "lora": Case(lambda arch: LoraConfig(r=4, lora_alpha=8), noop_at_init=True, peft_type="LORA"),
    "lora_all_linear_rslora": Case(
        lambda arch: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True), True, "LORA"
    ),
    # One case per placement; bottleneck_size 8 < hidden size 32 of the tiny models.
    **{
        f"bottleneck_{placement}": Case(
            lambda arch, placement=placement: BottleneckConfig(bottleneck_size=8, placement=placement, non_linearity="gelu"),
            True,
            "BOTTLENECK",
        )
        for placement in ("pfeiffer", "houlsby", "parallel")
    },
}
