"""One test config per registered method, used by the contract tests over every method.

A method file that registers a method adds its case here: ``CASES[name] = Case(build=..., ...)``.
``build(arch)`` returns the config to test on a tiny model of ``arch`` (or ``None`` when the method does
not apply there, e.g. BitFit on a model without biases). The contract test fails if a registered
``peft_type`` has no case, so no method escapes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from peftkit import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from peftkit.config import PeftConfig


@dataclass
class Case:
    build: Callable[[str], PeftConfig | None]
    noop_at_init: bool  # a fresh adapter leaves outputs unchanged
    peft_type: str


def _lm_only(make: Callable[[], PeftConfig]) -> Callable[[str], PeftConfig | None]:
    """Soft prompts support causal and encoder-decoder LMs; they refuse encoder-only models (BERT)."""
    return lambda arch: None if arch == "bert" else make()


CASES: dict[str, Case] = {
    "lora": Case(lambda arch: LoraConfig(r=4, lora_alpha=8), noop_at_init=True, peft_type="LORA"),
    "lora_all_linear_rslora": Case(
        lambda arch: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True), True, "LORA"
    ),
    "prompt_tuning": Case(_lm_only(lambda: PromptTuningConfig(num_virtual_tokens=4)), False, "PROMPT_TUNING"),
    "prefix_tuning": Case(_lm_only(lambda: PrefixTuningConfig(num_virtual_tokens=4)), False, "PREFIX_TUNING"),
    "prefix_tuning_mlp": Case(
        _lm_only(lambda: PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16)), False, "PREFIX_TUNING"
    ),
    "p_tuning": Case(_lm_only(lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16)), False, "P_TUNING"),
}
