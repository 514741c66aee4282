"""Will vLLM load this adapter? The limits of vLLM's LoRA loader, checked on what peftkit writes.

vLLM serves LoRA adapters saved in the Hugging Face PEFT format, next to the unchanged base model. Its
loader (``vllm/lora/peft_helper.py`` and the LoRA model loader) refuses an adapter that:

- is not LoRA (IA3, bottleneck adapters, soft prompts, selective or full fine-tuning);
- uses DoRA (``use_dora``): vLLM has no magnitude vector in its LoRA kernels;
- trains whole modules (``modules_to_save``): vLLM loads only LoRA matrices;
- adapts the output head (``lm_head`` in the targets): vLLM applies LoRA to the transformer's linear layers,
  not to the LM head;
- trains biases (``bias`` other than ``"none"``): vLLM loads LoRA biases only in the versions that have
  ``--enable-lora-bias``, and only when started with it.

An adapter that fails here still works in peftkit and ``peft``; for vLLM, merge it into the base model
(``peftkit merge``) and serve the merged model, or retrain without the option named.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class VllmCompatibilityWarning(UserWarning):
    """``save_pretrained`` wrote a LoRA adapter that vLLM will refuse to load (the message says why)."""


def vllm_problems(config: dict[str, Any], tensor_keys: Iterable[str] = ()) -> list[str]:
    """Why vLLM would refuse the adapter with this ``adapter_config.json`` and these tensor names (none: it loads)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        return [f"vLLM serves LoRA adapters only; this is a {peft_type} adapter"]
    problems = []
    if config.get("use_dora"):
        problems.append("use_dora=true: vLLM does not support DoRA")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']}: vLLM loads LoRA matrices only, not whole trained modules")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: vLLM loads LoRA biases only with --enable-lora-bias, in the versions that have it")
    heads = sorted({key.split(".lm_head.")[0] + ".lm_head" for key in tensor_keys if ".lm_head." in key})
    targets = config.get("target_modules")
    if heads or (isinstance(targets, (list, tuple)) and "lm_head" in targets):
        problems.append("lm_head is among the LoRA targets: vLLM does not apply LoRA to the output head "
                        "(target_modules='all-linear' leaves it out)")
    return problems
