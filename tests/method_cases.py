"""One test config per registered method, used by the contract tests over every method.

A method file that registers a method adds its case here: ``CASES[name] = Case(build=..., ...)``.
``build(arch)`` returns the config to test on a tiny model of ``arch`` (or ``None`` when the method does
not apply there, e.g. BitFit on a model without biases). The contract test fails if a registered
``peft_type`` has no case, so no method escapes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from peftkit import (
    BottleneckConfig,
    FullConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    SelectiveConfig,
)
from peftkit.config import PeftConfig
from peftkit.methods.adalora import AdaLoraConfig
from peftkit.methods.selective import BIAS_PATTERNS, NORM_PATTERNS

NO_BIASES = ("t5", "llama")  # architectures whose tiny models have no bias parameter at all


@dataclass
class Case:
    build: Callable[[str], PeftConfig | None]
    noop_at_init: bool  # a fresh adapter leaves outputs unchanged
    peft_type: str
    restores_base: bool = True  # unload() gives back the base bit for bit; False: it refuses (keeps no copy)


def _lm_only(make: Callable[[], PeftConfig]) -> Callable[[str], PeftConfig | None]:
    """Soft prompts support causal and encoder-decoder LMs; they refuse encoder-only models (BERT)."""
    return lambda arch: None if arch == "bert" else make()


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
    "dora": Case(lambda arch: LoraConfig(r=4, lora_alpha=8, use_dora=True), noop_at_init=True, peft_type="LORA"),
    "ia3": Case(lambda arch: IA3Config(), noop_at_init=True, peft_type="IA3"),
    "adalora": Case(lambda arch: AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8), noop_at_init=True, peft_type="ADALORA"),
    "bitfit": Case(
        lambda arch: None if arch in NO_BIASES else SelectiveConfig(patterns=BIAS_PATTERNS), True, "SELECTIVE"
    ),
    "norm": Case(lambda arch: SelectiveConfig(patterns=NORM_PATTERNS), noop_at_init=True, peft_type="SELECTIVE"),
    "last_layer": Case(lambda arch: SelectiveConfig(layers=[-1]), noop_at_init=True, peft_type="SELECTIVE"),
    "full": Case(lambda arch: FullConfig(), noop_at_init=True, peft_type="FULL", restores_base=False),
    "prompt_tuning": Case(_lm_only(lambda: PromptTuningConfig(num_virtual_tokens=4)), False, "PROMPT_TUNING"),
    "prefix_tuning": Case(_lm_only(lambda: PrefixTuningConfig(num_virtual_tokens=4)), False, "PREFIX_TUNING"),
    "prefix_tuning_mlp": Case(
        _lm_only(lambda: PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16)), False, "PREFIX_TUNING"
    ),
    "p_tuning": Case(_lm_only(lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16)), False, "P_TUNING"),
}
