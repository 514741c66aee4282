"""Method name -> (config class, tuner class). Methods register themselves; nothing else branches on them.

A method file ends with ``register(LoraConfig, LoraTuner)``. :class:`peftkit.PeftModel` then finds the
tuner for any config with :func:`tuner_for`, and the file loader finds the config class for the
``peft_type`` in an ``adapter_config.json`` with :func:`config_class_for`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import PeftConfig

if TYPE_CHECKING:
    from .tuner import Tuner

_CONFIGS: dict[str, type[PeftConfig]] = {}
_TUNERS: dict[type[PeftConfig], type["Tuner"]] = {}


def register(config_class: type[PeftConfig], tuner_class: type["Tuner"]) -> None:
    """Make a method available: configs of ``config_class`` are attached by ``tuner_class``."""
    if not config_class.peft_type:
        raise ValueError(f"{config_class.__name__} must set the class variable `peft_type`.")
    known = _CONFIGS.get(config_class.peft_type)
    if known is not None and known is not config_class:
        raise ValueError(f"peft_type {config_class.peft_type!r} is already registered by {known.__name__}.")
    _CONFIGS[config_class.peft_type] = config_class
    _TUNERS[config_class] = tuner_class


def registered_peft_types() -> list[str]:
    return sorted(_CONFIGS)


def config_class_for(peft_type: str) -> type[PeftConfig]:
    try:
        return _CONFIGS[peft_type]
    except KeyError:
        raise ValueError(
            f"Unknown peft_type {peft_type!r}; peftkit knows {registered_peft_types()}."
        ) from None


def tuner_for(config: PeftConfig) -> type["Tuner"]:
    for cls in type(config).__mro__:
        if cls in _TUNERS:
            return _TUNERS[cls]
    raise TypeError(f"No method is registered for {type(config).__name__}; known: {registered_peft_types()}.")


def config_from_dict(data: dict[str, Any], source: str = "config") -> PeftConfig:
    """Build the right config class for ``data["peft_type"]``."""
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ValueError(f"{source}: expected a JSON object with a 'peft_type' field.")
    return config_class_for(data["peft_type"]).from_dict(data, source=source)
