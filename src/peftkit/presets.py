"""Method presets: the names the CLI and experiments accept (``lora``, ``ia3``, ``bitfit``, ``full``, ...).

A preset turns the generic command-line options (:class:`MethodOptions`) into one method's config.
Method files register their presets next to the method (``register_preset(Preset("lora", ...))``),
so the CLI never branches on a method name. Each preset lists the options it uses: setting any
other option for it is an error rather than something silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import PeftConfig


@dataclass
class MethodOptions:
    """Options shared by the method presets (each preset uses a subset; see ``Preset.uses``).

    Args:
        rank: LoRA/DoRA rank r. Higher ranks fit more and train more parameters.
        alpha: LoRA scale numerator (update scaled by alpha/r). ``None`` means 2 * rank.
        dropout: Dropout on the adapter input while training (0 = off, and free; on a CPU a mask costs ~30%
            of a LoRA training step).
        target_modules: Modules to adapt (names, a regex, or "all-linear"); ``None`` uses the method's
            per-architecture default.
        num_virtual_tokens: Length of the soft prompt / prefix.
        init_text: Text whose token embeddings initialise a soft prompt.
        encoder_hidden_size: Hidden size of the reparameterization MLP (prefix tuning, P-tuning).
        bottleneck_size: Width of bottleneck adapters.
        placement: Where bottleneck adapters go: "pfeiffer", "houlsby" or "parallel".
        patterns: Regexes of parameter names to train (selective fine-tuning).
        layers: Layer indices selective fine-tuning is limited to.
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    num_virtual_tokens: int = 20
    init_text: str | None = None
    encoder_hidden_size: int | None = None
    bottleneck_size: int = 64
    placement: str = "pfeiffer"
    patterns: list[str] | None = None
    layers: list[int] | None = None

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2 * self.rank

    def changed(self) -> set[str]:
        """Names of the options that differ from their defaults."""
        default = MethodOptions()
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(default, f.name)}


@dataclass(frozen=True)
class Preset:
    """A named way to build a method's config from :class:`MethodOptions`.

    Args:
        name: What users type (``--method lora``).
        build: ``MethodOptions -> PeftConfig``.
        uses: The option names ``build`` reads; others are refused when set.
        help: One line for ``--help``.
        saves_full_model: The result is a complete model (full fine-tuning), not a small adapter.
        default_lr: The peak learning rate used when the user gives none (``--lr``). Methods differ by
            orders of magnitude: full fine-tuning moves pretrained weights and wants ~1e-5..5e-5, adapters
            start from zero or one and train well around 1e-4..1e-3, soft prompts want 1e-2 or more.
    """

    name: str
    build: Callable[[MethodOptions], PeftConfig]
    uses: frozenset[str] = field(default_factory=frozenset)
    help: str = ""
    saves_full_model: bool = False
    default_lr: float = 2e-4

    def __post_init__(self) -> None:
        if not self.default_lr > 0:
            raise ValueError(f"Preset {self.name!r}: default_lr must be > 0, got {self.default_lr!r}.")


_PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    if preset.name in _PRESETS and _PRESETS[preset.name] != preset:
        raise ValueError(f"Preset {preset.name!r} is registered twice.")
    _PRESETS[preset.name] = preset
    return preset


def presets() -> dict[str, Preset]:
    from . import methods  # noqa: F401  (importing the methods registers their presets)

    return dict(sorted(_PRESETS.items()))


def get_preset(name: str) -> Preset:
    known = presets()
    if name not in known:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(known)}.")
    return known[name]


def build_config(name: str, options: MethodOptions) -> PeftConfig:
    """The config for method ``name``; refuses options that this method would not use."""
    preset = get_preset(name)
    unused = sorted(options.changed() - preset.uses)
    if unused:
        raise ValueError(
            f"Method {name!r} does not use option(s) {', '.join(unused)}; it uses {', '.join(sorted(preset.uses)) or 'none'}."
        )
    return preset.build(options)
