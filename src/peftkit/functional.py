"""``peft``'s functions over adapter state, for code that manages the model object itself.

``inject_adapter_in_model`` puts an adapter's layers into a model in place and returns that model (no
:class:`PeftModel` around it); ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` read and write
one adapter's tensors under the keys of ``adapter_model.safetensors`` (what ``peft`` uses too, so a state
dict moves between the two packages).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .config import PeftConfig
from .methods.base import LayerTuner
from .model import PeftModel

__all__ = ["get_peft_model_state_dict", "inject_adapter_in_model", "set_peft_model_state_dict"]

_WRAPPER = "_peftkit_model"  # on a model given to inject_adapter_in_model: the PeftModel that manages its adapters


def inject_adapter_in_model(
    peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Add the layers of a layer method (LoRA, DoRA, IA3, bottleneck) to ``model`` in place and return it.

    The base weights are frozen and the adapter trains, as with ``get_peft_model``; only the wrapper is left
    out. ``state_dict`` (adapter tensors under file keys) is loaded into the new adapter when given.
    """
    if low_cpu_mem_usage:
        raise ValueError("peftkit creates adapter weights directly; drop low_cpu_mem_usage=True.")
    if isinstance(model, PeftModel):
        raise TypeError("The model is a PeftModel; use its add_adapter() instead.")
    peft_model = PeftModel(model, peft_config, adapter_name)
    if not isinstance(peft_model._tuners[adapter_name], LayerTuner):
        peft_model.unload()
        raise ValueError(f"inject_adapter_in_model needs a method that lives in the model's layers (LoRA, IA3, ...); "
                         f"{type(peft_config).__name__} needs get_peft_model().")
    if state_dict is not None:
        set_peft_model_state_dict(peft_model, state_dict, adapter_name)
    model.__dict__[_WRAPPER] = peft_model  # not a submodule: parameters and state_dict() stay the model's own
    return model


def _peft_model(model: nn.Module) -> PeftModel:
    if isinstance(model, PeftModel):
        return model
    wrapper = model.__dict__.get(_WRAPPER)
    if wrapper is None:
        raise TypeError(f"{type(model).__name__} has no peftkit adapter: wrap it with get_peft_model() or "
                        "inject_adapter_in_model() first.")
    return wrapper


def get_peft_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None, adapter_name: str = "default",
    unwrap_compiled: bool = False, save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name``, keyed as in ``adapter_model.safetensors`` (what ``peft`` returns)."""
    if state_dict is not None:
        raise ValueError("peftkit reads the adapter's tensors from the model; call without state_dict.")
    if save_embedding_layers is True:
        raise ValueError("peftkit saves adapter tensors only; save the embedding layers with the base model.")
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    return _peft_model(model)._tuner(adapter_name).state_dict()


def set_peft_model_state_dict(
    model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False,
) -> Any:
    """Load tensors keyed as in ``adapter_model.safetensors`` into the existing adapter ``adapter_name``.

    Every key and shape is checked before anything is written (a wrong key or shape raises, naming it), so
    the returned ``(missing_keys, unexpected_keys)`` are always empty.
    """
    if ignore_mismatched_sizes or low_cpu_mem_usage:
        raise ValueError("peftkit loads adapter tensors strictly; drop ignore_mismatched_sizes / low_cpu_mem_usage.")
    _peft_model(model)._tuner(adapter_name).load_state_dict(dict(peft_model_state_dict), source="state dict")
    return _IncompatibleKeys(missing_keys=[], unexpected_keys=[])
