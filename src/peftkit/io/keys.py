"""Pure key maps between peftkit's module paths and the Hugging Face PEFT file layout.

On disk ``peft`` stores a layer adapter's tensor as ``base_model.model.<module path>.<tensor>``, with
the adapter name removed (``...q_proj.lora_A.weight``, not ``...q_proj.lora_A.default.weight``).
"""

from __future__ import annotations

HF_PREFIX = "base_model.model."


def to_hf_key(module_path: str, tensor_name: str) -> str:
    """``("model.layers.0.self_attn.q_proj", "lora_A.weight")`` -> ``"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"``."""
    return f"{HF_PREFIX}{module_path}.{tensor_name}" if module_path else f"{HF_PREFIX}{tensor_name}"


def from_hf_key(key: str) -> str:
    """Strip ``base_model.model.``: the rest is ``<module path>.<tensor>`` in the base model."""
    if not key.startswith(HF_PREFIX):
        raise KeyError(f"{key!r} does not start with {HF_PREFIX!r}; it is not a layer-adapter key.")
    return key[len(HF_PREFIX):]
