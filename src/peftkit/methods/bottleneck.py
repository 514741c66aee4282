r"""Bottleneck adapters: small MLPs added inside each transformer block.

Houlsby et al. 2019 (https://arxiv.org/abs/1902.00751), Pfeiffer et al. 2020 "AdapterFusion"
(https://arxiv.org/abs/2005.00247), parallel adapters: He et al. 2021 (https://arxiv.org/abs/2110.04366).

One adapter is a down-projection to ``b`` dimensions, a non-linearity and an up-projection back::

    g(z) = scaling * W_up act(W_down z + b_down) + b_up     W_down (b x d_in), W_up (d_out x b)

``W_up`` and ``b_up`` start at zero, so a fresh adapter changes nothing. Where it goes (``placement``)::

    sequential (pfeiffer, houlsby)          parallel
        x                                      x ------------.
        |                                      |             |
     [ block ]  frozen: FFN or attn out      [ FFN ]       [ g ]
        |  h                                   |             |
        +---> h + g(h)                         +<------------'   FFN(x) + g(x)

``pfeiffer``: one sequential adapter after each feed-forward block. ``houlsby``: one after the self-attention
output projection too. ``parallel``: one beside each feed-forward block, reading the block's input.
Each adapter trains ``2 * d * b + b + d`` parameters (weights and biases) for a hidden size ``d``.

The non-linearity between the projections cannot be folded into a weight matrix, so these adapters
do not merge: they add layers (and a little latency) for as long as they are attached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ..config import PeftConfig
from ..inject import LINEAR_TYPES, Conv1D, describe_modules, get_submodule, model_type, module_names, name_matches, named_base_modules
from ..registry import Preset, register
from .base import AdapterLayer, LayerTuner

Placement = Literal["pfeiffer", "houlsby", "parallel"]
NonLinearity = Literal["relu", "gelu", "silu", "tanh"]
PLACEMENTS: tuple[str, ...] = Placement.__args__  # type: ignore[attr-defined]
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

# Where the adapters go, per architecture. Module names are suffixes; a string is a regex over the full name.
# Every target is a module that takes the hidden states as its only argument and returns one tensor.
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
_T5_LIKE = ("t5", "mt5")
_BART_LIKE = ("bart", "mbart")
_BERT_LIKE = ("bert", "roberta")
# BERT's feed-forward output is `layer.N.output.dense`; the suffix "output.dense" would also match the
# attention's `attention.output.dense`, hence a regex.
_BERT_FFN_OUT = r".*layer\.\d+\.output\.dense"
_BERT_BOTH_OUT = r".*layer\.\d+\.(attention\.)?output\.dense"

FFN_TARGETS: dict[str, list[str] | str] = {
    **{t: ["mlp"] for t in _LLAMA_LIKE},
    **{t: ["DenseReluDense"] for t in _T5_LIKE},
    # BART's feed-forward is `fc2(act(fc1(x)))` written inline in the layer: no module holds the whole
    # block. Its output is fc2's output (before dropout and the residual sum), so sequential adapters
    # wrap fc2. A parallel adapter needs the block's *input* too, which only fc1 sees: see FFN_INPUTS.
    **{t: ["fc2"] for t in _BART_LIKE},
    "gpt2": ["mlp"],
    **{t: _BERT_FFN_OUT for t in _BERT_LIKE},
}
# Self-attention output projections (Houlsby's first adapter). Cross-attention is left alone, as in
# Houlsby's encoder-only setting and AdapterHub's default.
ATTENTION_TARGETS: dict[str, list[str] | str] = {
    **{t: ["self_attn.o_proj"] for t in _LLAMA_LIKE},
    **{t: ["SelfAttention.o"] for t in _T5_LIKE},
    **{t: ["self_attn.out_proj"] for t in _BART_LIKE},
    "gpt2": ["attn.c_proj"],
}
DEFAULT_TARGETS: dict[str, dict[str, list[str] | str]] = {
    "pfeiffer": FFN_TARGETS,
    "houlsby": {
        **{t: ATTENTION_TARGETS[t] + FFN_TARGETS[t] for t in ATTENTION_TARGETS},
        **{t: _BERT_BOTH_OUT for t in _BERT_LIKE},
    },
    "parallel": FFN_TARGETS,
}
# Post-LN models whose feed-forward block is two sibling Linears (BART fc1/fc2, BERT intermediate/output):
# the parallel adapter reads the input of the first module and adds to the output of the second.
FFN_INPUTS: dict[str, list[str]] = {
    **{t: ["fc1"] for t in _BART_LIKE},
    **{t: ["intermediate"] for t in _BERT_LIKE},
}


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of bottleneck adapters (``peft`` has no such method: ``peft_type="BOTTLENECK"``).

    Args:
        bottleneck_size: Width ``b`` of the adapter's hidden layer. Each adapter trains about ``2 * d * b``
            parameters for hidden size ``d``: larger sizes fit more, smaller ones train less. Keep it
            below ``d``, or there is no bottleneck.
        placement: ``"pfeiffer"`` (after each feed-forward block: one adapter per layer, which Pfeiffer et al.
            found on par with Houlsby's two), ``"houlsby"`` (after self-attention and after the feed-forward
            block: two per layer), or ``"parallel"`` (beside each feed-forward block, reading its input:
            He et al. find it beats sequential adapters at equal size). With ``target_modules`` set, the
            placement only decides the wiring: sequential (``h + g(h)``) or parallel (``module(x) + g(x)``).
        non_linearity: Activation between the projections: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
            ReLU is the common default (AdapterHub uses it for Pfeiffer adapters, SiLU/swish for Houlsby ones);
            the base model's own activation is another natural choice.
        scaling: Multiplies the adapter's output. 1.0 is the classic adapter; He et al. use 4.0 for parallel
            adapters, which acts like a larger learning rate for the up-projection.
        target_modules: Modules whose output the adapter follows (sequential) or runs beside (parallel): a list
            of module-name suffixes or a regex matched against full names. Each must take the hidden states
            as its only input and return one tensor (a feed-forward block such as Llama's ``mlp`` or an
            output projection such as ``o_proj``). ``None`` uses this placement's defaults for T5, BART,
            GPT-2, Llama, BERT and close relatives.
        parallel_input_modules: Parallel placement only: modules whose *input* the adapter reads when it is not
            the input of the target itself. Needed where the feed-forward block is two sibling modules, not
            one (BART ``fc1`` -> ``fc2``, BERT ``intermediate`` -> ``output.dense``); each target is paired
            with the matching module nearest to it in the model. ``None``: the defaults for those
            architectures when ``target_modules`` is ``None`` too, otherwise each target's own input.
        exclude_modules: Names (same rules as ``target_modules``) to leave alone even when matched.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a new classifier head).
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    bottleneck_size: int = 64
    placement: Placement = "pfeiffer"
    non_linearity: NonLinearity = "relu"
    scaling: float = 1.0
    target_modules: list[str] | str | None = None
    parallel_input_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        size = self.bottleneck_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"BottleneckConfig: bottleneck_size must be an integer >= 1, got {size!r}.")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"BottleneckConfig: placement must be one of {list(PLACEMENTS)}, got {self.placement!r}.")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(
                f"BottleneckConfig: non_linearity must be one of {list(ACTIVATIONS)}, got {self.non_linearity!r}."
            )
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) or not self.scaling > 0:
            raise ValueError(f"BottleneckConfig: scaling must be a positive number, got {self.scaling!r}.")
        for name in ("target_modules", "parallel_input_modules", "exclude_modules", "modules_to_save"):
            setattr(self, name, module_names(getattr(self, name), f"BottleneckConfig: {name}", regex_ok=name != "modules_to_save",
                                              allow_empty=False))
        if self.parallel_input_modules is not None and self.placement != "parallel":
            raise ValueError(
                f"BottleneckConfig: parallel_input_modules is only used with placement='parallel' "
                f"(placement is {self.placement!r}); remove it or change the placement."
            )


def _features(module: nn.Module, path: str) -> tuple[int, int]:
    """(input size, output size) of a module: its first Linear's input and its last Linear's output."""
    linears = [m for m in module.modules() if isinstance(m, LINEAR_TYPES)]
    if not linears:
        raise ValueError(
            f"BottleneckConfig: cannot tell the hidden size at {path} ({type(module).__name__}): it holds no "
            "Linear layer. Target a feed-forward block or an output projection."
        )

    def in_out(m: nn.Module) -> tuple[int, int]:
        k, d = m.weight.shape if isinstance(m, Conv1D) else (m.in_features, m.out_features)  # Conv1D stores (in, out)
        return int(k), int(d)

    return in_out(linears[0])[0], in_out(linears[-1])[1]


class _Stash:
    """Hands the feed-forward input from the module that sees it to the adapter that needs it.

    Within one forward of a layer the input module (BART ``fc1``) always runs before the target (``fc2``), once
    per row group of a mixed batch and in the same group order, so one slot per adapter suffices.
    """

    __slots__ = ("x",)

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None

    def take(self, where: str) -> torch.Tensor:
        x, self.x = self.x, None  # do not keep the activation alive past its use
        if x is None:
            raise RuntimeError(f"The parallel bottleneck adapter at {where} ran before its input module recorded an input.")
        return x


class BottleneckLayer(AdapterLayer):
    """One bottleneck adapter in the host of a target module.

    ``forward(x, base)``: x (..., k) -> (..., d), where ``base`` is the frozen target:
    sequential ``h + g(h)`` with ``h = base(x)``; parallel ``base(x) + g(x)``, or ``base(x) + g(x0)`` with
    ``x0`` (..., d_in) the input of a paired module (``stash``). ``g(z) = scaling * up(act(down(z)))``.
    """

    def __init__(
        self, in_features: int, out_features: int, size: int, non_linearity: str, scaling: float,
        parallel: bool, stash: _Stash | None = None, path: str = "",
    ) -> None:
        super().__init__()
        self.parallel, self.stash, self.path = parallel, stash, path
        self.scaling = float(scaling)
        self.adapter_down = nn.Linear(in_features, size)
        self.act = ACTIVATIONS[non_linearity]()
        self.adapter_up = nn.Linear(size, out_features)
        nn.init.zeros_(self.adapter_up.weight)  # a fresh adapter adds exactly zero
        nn.init.zeros_(self.adapter_up.bias)

    def delta(self, z: torch.Tensor) -> torch.Tensor:
        """``g(z)``: z (..., d_in) -> (..., d_out)."""
        weight = self.adapter_down.weight
        if z.dtype != weight.dtype and not torch.is_autocast_enabled(z.device.type):
            z = z.to(weight.dtype)  # fp32 adapter on a bf16/fp16 base
        return self.adapter_up(self.act(self.adapter_down(z))) * self.scaling

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        out = base(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"The bottleneck adapter at {self.path} needs a module that returns one tensor, but it returned "
                f"{type(out).__name__}. Target its output projection instead (e.g. 'o_proj' rather than 'self_attn')."
            )
        source = out if not self.parallel else (x if self.stash is None else self.stash.take(self.path))
        return out + self.delta(source).to(out.dtype)


class FeedForwardInputTap(AdapterLayer):
    """No parameters: records the input of a parallel adapter's input module (BART ``fc1``) and runs it unchanged."""

    def __init__(self, stash: _Stash) -> None:
        super().__init__()
        self.stash = stash

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        self.stash.x = x
        return base(x)


class BottleneckTuner(LayerTuner):
    """Attaches :class:`BottleneckConfig` adapters: one :class:`BottleneckLayer` per target module, plus an
    input tap on the paired module where a parallel adapter reads another module's input."""

    supported = (nn.Module,)  # a feed-forward block or a projection; _features() checks it has Linears

    # --- which modules --------------------------------------------------------------------------------
    def target_modules(self):
        if self.config.target_modules is not None:
            return self.config.target_modules
        kind = model_type(self.model)
        table = DEFAULT_TARGETS[self.config.placement]
        if kind not in table:
            raise ValueError(
                f"BottleneckConfig: no default target_modules for model type {kind!r} with placement="
                f"{self.config.placement!r} (defaults exist for {', '.join(sorted(table))}). Set target_modules "
                "to the modules the adapters follow: the feed-forward blocks (like Llama's 'mlp' or T5's "
                "'DenseReluDense'), and for 'houlsby' the self-attention output projections too (like 'o_proj'). "
                f"Modules of this model that hold Linear layers: {describe_modules(self.model, LINEAR_TYPES, holding=True)}"
            )
        return table[kind]

    def parallel_input_modules(self):
        c = self.config
        if c.parallel_input_modules is not None:
            return c.parallel_input_modules
        if c.placement == "parallel" and c.target_modules is None:
            return FFN_INPUTS.get(model_type(self.model))
        return None

    def find_targets(self) -> list[str]:
        targets = super().find_targets()
        inputs = self.parallel_input_modules()
        self._input_of = _pair_with_inputs(self.model, targets, inputs) if inputs is not None else {}
        self._stashes = {target: _Stash() for target in self._input_of}
        return targets + list(self._input_of.values())

    # --- the layers -----------------------------------------------------------------------------------
    def make_layer(self, module: nn.Module, path: str) -> AdapterLayer:
        c = self.config
        for target, input_path in self._input_of.items():
            if path == input_path:
                return FeedForwardInputTap(self._stashes[target])
        d_in, d_out = _features(module, path)
        if c.placement == "parallel" and path in self._input_of:
            d_in = _features(get_submodule(self.model, self._input_of[path]), self._input_of[path])[0]
        elif c.placement != "parallel":
            d_in = d_out  # a sequential adapter reads the module's output
        return BottleneckLayer(
            d_in, d_out, c.bottleneck_size, c.non_linearity, c.scaling,
            parallel=c.placement == "parallel", stash=self._stashes.get(path), path=path,
        )

    def merge(self) -> None:
        raise TypeError(
            "BottleneckConfig adapters cannot be merged into the base weights: the non-linearity between the "
            "down- and up-projection is not a linear map. Keep the PeftModel for inference (or unload() it)."
        )

    def config_dict(self) -> dict:
        d = super().config_dict()
        d["target_modules"] = self.target_modules()
        d["parallel_input_modules"] = self.parallel_input_modules()
        return d


def _pair_with_inputs(model: nn.Module, targets: list[str], inputs) -> dict[str, str]:
    """``{target path: input module path}``: for each target, the module matching ``inputs`` that shares the
    longest name prefix with it (``...layers.3.fc2`` -> ``...layers.3.fc1``). Each must be unique."""
    candidates = [n for n, _ in named_base_modules(model) if name_matches(n, inputs)]
    if not candidates:
        raise ValueError(
            f"BottleneckConfig: parallel_input_modules={inputs!r} matches no module of {type(model).__name__}. "
            f"Modules that hold Linear layers: {describe_modules(model, LINEAR_TYPES, holding=True)}"
        )

    def shared(a: str, b: str) -> int:
        n = 0
        for x, y in zip(a.split("."), b.split(".")):
            if x != y:
                break
            n += 1
        return n

    pairs: dict[str, str] = {}
    for target in targets:
        scored = [(shared(target, c), c) for c in candidates if c != target]
        best = max((s for s, _ in scored), default=None)
        nearest = [c for s, c in scored if s == best]
        if len(nearest) != 1:
            raise ValueError(
                f"BottleneckConfig: cannot pair target {target!r} with one input module from "
                f"parallel_input_modules={inputs!r} (nearest: {nearest or 'none'}). Use names that pick one module per target."
            )
        pairs[target] = nearest[0]
    inputs_used = list(pairs.values())
    clashes = sorted({i for i in inputs_used if inputs_used.count(i) > 1 or i in pairs})
    if clashes:
        raise ValueError(
            f"BottleneckConfig: input module(s) {clashes} would serve several targets or are targets themselves; "
            "each parallel adapter needs an input module of its own."
        )
    return pairs


register(BottleneckConfig, BottleneckTuner,
         Preset("bottleneck", "bottleneck adapters: down-project, non-linearity, up-project, after (or beside) each block",
                default_lr=5e-4))
