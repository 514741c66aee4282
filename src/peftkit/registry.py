"""Method name -> (config class, tuner class, presets). Methods register themselves; nothing else branches on them.

A method file ends with one call, ``register(LoraConfig, LoraTuner, Preset("lora", ...), ...)``.
:class:`peftkit.PeftModel` then finds the tuner for any config with :func:`tuner_for`, the file loader
finds the config class for the ``peft_type`` in an ``adapter_config.json`` with :func:`config_class_for`,
and the command line, YAML files and ``--set`` find what ``--method NAME`` means with :func:`get_preset`.

A :class:`Preset` is a named, partial config of one method: ``bitfit`` is :class:`SelectiveConfig` with
``patterns`` fixed to the bias names, ``dora`` is :class:`LoraConfig` with ``use_dora`` fixed. Its options
are the config class's own fields (peft's names: ``r``, ``lora_alpha``, ``target_modules``, ...) minus the
fixed ones, so the config class is the only declaration of a method's settings.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import PeftConfig

if TYPE_CHECKING:
    from .tuner import Tuner

_CONFIGS: dict[str, type[PeftConfig]] = {}
_TUNERS: dict[type[PeftConfig], type["Tuner"]] = {}
_PRESETS: dict[str, "Preset"] = {}

# PeftConfig's own fields (task type, base model name, ...) are bookkeeping filled from the model, not
# method options a user sets on the command line.
_BOOKKEEPING = frozenset(f.name for f in dataclasses.fields(PeftConfig))


@dataclass(frozen=True)
class Preset:
    """A name users type (``--method NAME``) for a method's config, partly filled in.

    Args:
        name: What users type (``--method lora``, ``--methods baseline,lora`` in a comparison).
        help: One line for ``peftkit methods`` and ``--help``: what the method does.
        default_lr: The peak learning rate used when the user gives none (``--lr``). Methods differ by
            orders of magnitude: full fine-tuning moves pretrained weights and wants ~1e-5..5e-5, adapters
            start from zero or one and train well around 1e-4..1e-3, soft prompts want 1e-2 or more.
        fixed: Config fields this preset sets and users may not change (``bitfit``: the bias patterns).
        defaults: Config fields whose default differs from the config class's, for this preset.
        saves_full_model: The result is a complete model (full fine-tuning), not a small adapter.
        legacy: Old option names still read for one release: ``{old name: function(values) -> values}``
            turning a settings dict that uses old names into one that does not (it may print a warning).
        config_class: The method's config class; :func:`register` fills it in.
    """

    name: str
    help: str
    default_lr: float
    fixed: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    saves_full_model: bool = False
    legacy: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = field(default_factory=dict)
    config_class: type[PeftConfig] | None = None

    def __post_init__(self) -> None:
        if not self.default_lr > 0:
            raise ValueError(f"Preset {self.name!r}: default_lr must be > 0, got {self.default_lr!r}.")

    def options(self) -> list[str]:
        """The settings a user may give this preset: the config class's own fields, less the fixed ones."""
        assert self.config_class is not None, f"preset {self.name!r} is not registered"
        return [f.name for f in dataclasses.fields(self.config_class)
                if f.name not in _BOOKKEEPING and f.name not in self.fixed]

    def option_types(self) -> dict[str, Any]:
        hints = typing.get_type_hints(self.config_class)
        return {name: hints[name] for name in self.options()}

    def option_defaults(self) -> dict[str, Any]:
        blank = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                 for f in dataclasses.fields(self.config_class)}
        return {name: self.defaults.get(name, blank[name]) for name in self.options()}

    def read(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` (YAML values or command-line text, by option name) checked and converted to each
        option's type; an unknown or fixed option is an error that lists the ones this preset takes."""
        from .options import coerce  # options imports nothing from here; imported late to keep registry light

        values = dict(values)
        for old, upgrade in self.legacy.items():
            if old in values:
                values = upgrade(values)
        types = self.option_types()
        out = {}
        for key, value in values.items():
            if key in self.fixed:
                raise ValueError(f"Method {self.name!r} fixes {key}={self.fixed[key]!r}; it cannot be set. "
                                 f"(It takes: {', '.join(types) or 'no options'}.)")
            if key not in types:
                raise ValueError(f"Method {self.name!r} has no option {key!r}; it takes: {', '.join(types) or 'no options'} "
                                 "(`peftkit methods` lists every method's options).")
            out[key] = coerce(value, types[key], f"{self.name}.{key}")
        return out

    def build(self, values: dict[str, Any] | None = None) -> PeftConfig:
        """The method's config: this preset's defaults, then ``values`` (see :meth:`read`), then the fixed fields."""
        assert self.config_class is not None, f"preset {self.name!r} is not registered"
        return self.config_class(**{**self.defaults, **self.read(values or {}), **self.fixed})


def register(config_class: type[PeftConfig], tuner_class: type["Tuner"], *presets: Preset) -> None:
    """Make a method available: configs of ``config_class`` are attached by ``tuner_class``; each preset
    becomes a name for ``--method``."""
    if not config_class.peft_type:
        raise ValueError(f"{config_class.__name__} must set the class variable `peft_type`.")
    known = _CONFIGS.get(config_class.peft_type)
    if known is not None and known is not config_class:
        raise ValueError(f"peft_type {config_class.peft_type!r} is already registered by {known.__name__}.")
    _CONFIGS[config_class.peft_type] = config_class
    _TUNERS[config_class] = tuner_class
    for preset in presets:
        preset = dataclasses.replace(preset, config_class=config_class)
        unknown = sorted((set(preset.fixed) | set(preset.defaults)) - {f.name for f in dataclasses.fields(config_class)})
        if unknown:
            raise ValueError(f"Preset {preset.name!r} names field(s) {', '.join(unknown)} that {config_class.__name__} lacks.")
        if preset.name in _PRESETS and _PRESETS[preset.name].config_class is not config_class:
            raise ValueError(f"Method name {preset.name!r} is already registered by "
                             f"{_PRESETS[preset.name].config_class.__name__}.")
        _PRESETS[preset.name] = preset


def unregister(config_class: type[PeftConfig]) -> None:
    """Forget a method and its presets (for tests that register a method of their own)."""
    _CONFIGS.pop(config_class.peft_type, None)
    _TUNERS.pop(config_class, None)
    for name in [n for n, p in _PRESETS.items() if p.config_class is config_class]:
        del _PRESETS[name]


def registered_peft_types() -> list[str]:
    return sorted(_CONFIGS)


def presets() -> dict[str, Preset]:
    """Every name ``--method`` takes, sorted."""
    from . import methods  # noqa: F401  (importing the methods registers them)

    return dict(sorted(_PRESETS.items()))


def get_preset(name: str) -> Preset:
    known = presets()
    if name not in known:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(known)}.")
    return known[name]


def option_names() -> dict[str, list[str]]:
    """``{option: [methods that take it]}`` over every preset, old names included (for flags and flat keys)."""
    out: dict[str, list[str]] = {}
    for name, preset in presets().items():
        for option in [*preset.options(), *preset.legacy]:
            out.setdefault(option, []).append(name)
    return out


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


def warn(message: str) -> None:
    """A deprecation notice on stderr (once per message and process)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"peftkit: warning: {message}", file=sys.stderr)


_WARNED: set[str] = set()
