r"""LoRA: low-rank adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

The frozen weight ``W`` (d x k) gets a trainable low-rank update ``B A`` with ``A`` (r x k) and
``B`` (d x r)::

        x (.., k)
        |-----------------.
        |                 |
     [ W (d x k) ]    [ A (r x k) ]   A: Kaiming-uniform init
        |  frozen         |
        |             [ B (d x r) ]   B: zero init, so a fresh adapter changes nothing
        |                 | * scaling
        +<----------------'
        h (.., d)        h = W x + (alpha / r) B A x        (alpha / sqrt(r) with rsLoRA)

A 512 x 64 weight with r = 8 trains 8*64 + 512*8 = 4,608 parameters instead of 32,768.
``delta_weight() = scaling * B @ A`` is the single source of the math for merge and unmerge.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig
from ..inject import Conv1D, check_regex, get_submodule, module_names
from ..io.keys import HF_PREFIX
from ..quantize import is_quantized_linear
from ..registry import Preset, register
from .base import AdapterLayer, DeltaWeightLayer, LayerTuner, ModuleCopy

# Attention query and value projections per architecture: the LoRA paper (Hu et al., 2021, section 7.1) finds
# adapting the self-attention layers enough, and q/v is its choice.
LORA_DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: ["q", "v"] for t in ("t5", "mt5", "umt5", "longt5")},
    **{
        t: ["q_proj", "v_proj"]
        for t in ("bart", "mbart", "marian", "pegasus", "llama", "mistral", "mixtral", "qwen2", "qwen3",
                  "opt", "gemma", "gemma2", "phi", "phi3", "gptj", "olmo", "olmo2", "granite", "smollm3")
    },
    "gpt2": ["c_attn"],
    **{t: ["query", "value"] for t in ("bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2")},
    "distilbert": ["q_lin", "v_lin"],
    **{t: ["query_key_value"] for t in ("gpt_neox", "bloom", "falcon")},
}


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter (field names as in ``peft.LoraConfig``).

    Args:
        r: Rank of the update. Larger ranks can fit more but train more parameters; 4-64 is typical.
        lora_alpha: Scale numerator: the update is multiplied by ``lora_alpha / r``. Keeping alpha fixed
            while changing r changes the effective learning rate of the adapter.
        lora_dropout: Dropout on the adapter's input during training (0 disables it, at no cost).
        target_modules: Which modules get an adapter: a list of module-name suffixes (``["q_proj",
            "v_proj"]``), a regex matched against full names, or ``"all-linear"`` (every linear layer but
            the output head). ``None`` picks the attention query/value projections of known architectures.
        exclude_modules: Names (same rules) to leave alone even when ``target_modules`` matches them.
        bias: Which biases train too: ``"none"``, ``"all"`` or ``"lora_only"`` (biases of adapted
            layers). Trained biases change the base model and are saved with the adapter.
        use_rslora: Scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA), which keeps updates stable at high ranks.
        use_dora: DoRA (:mod:`peftkit.methods.dora`): also train a magnitude per output row, with ``B A``
            updating only the direction of ``W``. Closer to full fine-tuning at the same rank, at the
            cost of a slower forward (it needs ``W`` itself). Linear and ``Conv1D`` layers only.
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero: starts as a no-op), ``"gaussian"`` (A
            normal with std 1/r, B zero), or ``False`` (random B too: not a no-op; for tests).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a new classifier head).
        rank_pattern: ``{name pattern: rank}`` overriding ``r`` for matching modules.
        alpha_pattern: ``{name pattern: alpha}`` overriding ``lora_alpha`` for matching modules.
        fan_in_fan_out: Whether the target stores its weight as (in, out), like GPT-2's ``Conv1D``.
            ``None`` (default) decides per layer from its type; an explicit value that contradicts the
            layer type is an error.
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig: r must be an integer >= 1, got {self.r!r}.")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig: lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"LoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig: bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        if self.use_dora not in (True, False):
            raise ValueError(f"LoraConfig: use_dora must be True or False, got {self.use_dora!r}.")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoraConfig: init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}.")
        if self.fan_in_fan_out not in (None, True, False):
            raise ValueError(f"LoraConfig: fan_in_fan_out must be True, False or None (decide per layer), got {self.fan_in_fan_out!r}.")
        self.target_modules = module_names(self.target_modules, "LoraConfig: target_modules")
        self.exclude_modules = module_names(self.exclude_modules, "LoraConfig: exclude_modules")
        if self.modules_to_save is not None:
            self.modules_to_save = module_names(list(self.modules_to_save), "LoraConfig: modules_to_save")
        for key, rank in self.rank_pattern.items():
            check_regex(str(key), "LoraConfig: rank_pattern key")
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"LoraConfig: rank_pattern[{key!r}] must be an integer >= 1, got {rank!r}.")
        for key, alpha in self.alpha_pattern.items():
            check_regex(str(key), "LoraConfig: alpha_pattern key")
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
                raise ValueError(f"LoraConfig: alpha_pattern[{key!r}] must be a positive number, got {alpha!r}.")

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        return (_lookup(self.rank_pattern, module_path, self.r), _lookup(self.alpha_pattern, module_path, self.lora_alpha))


def _layer_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(input size, output size) of the matrix LoRA adapts: a Conv2d's input is a whole receptive field."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)  # stored (in, out)
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1], module.out_channels
    return None


def _lookup(patterns: dict, module_path: str, default):
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module_path):
            return value
    return default


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _match_input_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Adapters keep fp32 weights on a bf16/fp16 base; autocast handles the mix when it is on.
    if x.dtype != weight.dtype and x.is_floating_point() and not torch.is_autocast_enabled(x.device.type):
        return x.to(weight.dtype)
    return x


def _init_pair(a: torch.Tensor, b: torch.Tensor, init, r: int) -> None:
    """``True``: A Kaiming-uniform, B zero (a no-op); ``"gaussian"``: A ~ N(0, 1/r), B zero; ``False``: as built."""
    if init is True:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(a, std=1 / r)
    if init in (True, "gaussian"):
        nn.init.zeros_(b)


class LoraLayer(DeltaWeightLayer):
    """What every LoRA layer shares: an additive update whose weight form, ``delta_weight()``, is the one
    source of merge (``W += delta``) and unmerge (``W -= delta``)."""


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` (weight d x k) or GPT-2 ``Conv1D`` (weight stored k x d: ``fan_in_fan_out``).

    ``delta(x)``: x (..., k) -> (..., d), ``scaling * B(A(dropout(x)))``.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, init, fan_in_fan_out: bool):
        super().__init__()
        # A Linear's sizes come from its attributes: a quantized one (bitsandbytes) stores its weight packed.
        k, d = base.weight.shape if fan_in_fan_out else (base.in_features, base.out_features)
        self.fan_in_fan_out = fan_in_fan_out
        self.r, self.scaling = r, _scaling(alpha, r, rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(k, r, bias=False)
        self.lora_B = nn.Linear(r, d, bias=False)
        _init_pair(self.lora_A.weight, self.lora_B.weight, init, r)
        self.folded: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (W + s B A, bias) inside fold()

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        if self.folded is not None:  # one matmul with W + s B A, as fast as the merged model
            weight, bias = self.folded
            if self.fan_in_fan_out:  # Conv1D: weight (k, d)
                return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[1])
            return F.linear(x, weight, bias)
        # Same math as ``base(x) + delta(x)`` in three kernels (linear, linear, add with alpha): an
        # unmerged adapter at decode time is dominated by per-op overhead, not FLOPs.
        out = base(x)
        lora = self._lora_product(x)
        return torch.add(out, lora.to(out.dtype), alpha=self.scaling)

    @torch.no_grad()
    def fold(self, base_layer: nn.Module) -> None:
        """Compute with ``W + s B A`` (added in fp32, stored in the base weight's dtype) until :meth:`unfold`,
        leaving ``W`` untouched. For generation, where the same weights serve every new token: the unmerged
        forward's two extra small matmuls per token cost more than the matmul itself at small batches."""
        weight = base_layer.weight
        self.folded = ((weight.float() + self.delta_weight().float()).to(weight.dtype), base_layer.bias)

    def unfold(self) -> None:
        self.folded = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self._lora_product(x) * self.scaling

    def _lora_product(self, x: torch.Tensor) -> torch.Tensor:
        """``B A dropout(x)`` without the scaling: (..., k) -> (..., d)."""
        x = _match_input_dtype(x, self.lora_A.weight)
        if not isinstance(self.lora_dropout, nn.Identity):
            x = self.lora_dropout(x)
        return F.linear(F.linear(x, self.lora_A.weight), self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout: (d, k), or (k, d) for fan_in_fan_out."""
        w = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return w.T if self.fan_in_fan_out else w

    @staticmethod
    def mixed_delta(layers: list["LoraLinear | None"], x: torch.Tensor, groups, index: torch.Tensor) -> torch.Tensor:
        """Deltas for a mixed batch: the rows in ``groups[i]`` (``index[row] == i``) get ``layers[i].delta(x[rows])``,
        rows whose entry is ``None`` (no adapter here) get 0. x (B, ..., k) -> (B, ..., d).

        At inference, two matmuls for all adapters at once: the A's of the n adapters stacked into one
        (sum r_i, k) matrix, the scaled B's side by side into one (d, sum r_i) matrix, and between them a
        0/1 mask that keeps, in each row, only the r_i columns of that row's adapter::

            delta = ((x A_all^T) * mask[row]) B_all^T

        The extra work on the other adapters' columns is tiny (r is small), while a loop over adapters, or
        a per-row gather of weights (Punica's BGMV), costs several kernels per layer and decoding step.
        In training (gradients on) or with active dropout it loops over the groups instead.
        """
        present = [layer for layer in layers if layer is not None]
        if torch.is_grad_enabled() or any(layer.dropout_active() for layer in present):
            out = None
            for layer, (_, rows) in zip(layers, groups):
                if layer is None:
                    continue
                part = layer.delta(x.index_select(0, rows))
                out = part.new_zeros(x.shape[:-1] + part.shape[-1:]) if out is None else out
                out = out.index_add(0, rows, part)
            return out
        a, b, mask = _stacked(layers, index)  # (R, k), (d, R), (B, R) with R = sum of the ranks
        x = _match_input_dtype(x, a)
        xa = F.linear(x, a) * mask.view(mask.shape[:1] + (1,) * (x.dim() - 2) + mask.shape[1:])  # (B, ..., R)
        return F.linear(xa, b)

    def dropout_active(self) -> bool:
        return self.training and not isinstance(self.lora_dropout, nn.Identity)


def _stacked(layers: list[LoraLinear | None], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A_all`` (R, k), ``B_all`` (d, R) (scalings folded in) and the row mask (B, R) of :meth:`LoraLinear.mixed_delta`.

    Cached on the first present layer: the stacks until the list of layers, a scaling or a weight changes
    (``_version`` counts in-place updates such as optimizer steps and ``copy_``), the mask for as long as the
    same ``index`` (one per call, from :meth:`Routing.row_index`) comes back, i.e. for every step of a generate call.
    """
    present = [layer for layer in layers if layer is not None]
    cache = present[0].__dict__.get("_stack_cache")  # a plain attribute: not a buffer, never saved
    if not (
        cache is not None
        and len(cache["layers"]) == len(layers)
        and all(old is new for old, new in zip(cache["layers"], layers))
        and cache["scalings"] == [layer.scaling for layer in present]
        and all(p._version == version for p, version in cache["versions"])
    ):
        cache = {
            "layers": list(layers),
            "scalings": [layer.scaling for layer in present],
            "versions": [(p, p._version) for l in present for p in (l.lora_A.weight, l.lora_B.weight)],
            "a": torch.cat([l.lora_A.weight for l in present]),  # (R, k)
            "b": torch.cat([l.lora_B.weight * l.scaling for l in present], dim=1),  # (d, R)
            "mask": None,
        }
        present[0].__dict__["_stack_cache"] = cache
    if cache["mask"] is None or cache["mask"][0] is not index:
        a = cache["a"]
        blocks = torch.zeros(len(layers), a.shape[0], dtype=a.dtype, device=a.device)  # group -> its columns
        start = 0
        for i, layer in enumerate(layers):
            if layer is not None:
                blocks[i, start : start + layer.r] = 1
                start += layer.r
        cache["mask"] = (index, blocks.index_select(0, index.to(a.device)))
    return cache["a"], cache["b"], cache["mask"][1]


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding`` (num_embeddings x dim): ``delta(ids) = scaling * A[:, ids].T @ B.T``.

    As in ``peft``, ``lora_embedding_A`` (r x num_embeddings) starts at zero and
    ``lora_embedding_B`` (dim x r) normal, so a fresh adapter is a no-op.
    """

    def __init__(self, base: nn.Embedding, r: int, alpha: float, dropout: float, rslora: bool, init):
        super().__init__()
        self.r, self.scaling = r, _scaling(alpha, r, rslora)
        self.padding_idx, self.max_norm = base.padding_idx, base.max_norm
        self.lora_embedding_A = nn.Parameter(torch.randn(r, base.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r))
        if init in (True, "gaussian"):
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    def delta(self, ids: torch.Tensor) -> torch.Tensor:
        after_a = F.embedding(ids, self.lora_embedding_A.T, padding_idx=self.padding_idx, max_norm=self.max_norm)
        return (after_a @ self.lora_embedding_B.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling


class LoraConv2d(LoraLayer):
    """LoRA on ``nn.Conv2d``: A is a conv with the base kernel (in -> r channels), B a 1x1 conv (r -> out)."""

    def __init__(self, base: nn.Conv2d, r: int, alpha: float, dropout: float, rslora: bool, init):
        super().__init__()
        if base.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported; exclude this layer from target_modules.")
        self.r, self.scaling = r, _scaling(alpha, r, rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
        self.lora_B = nn.Conv2d(r, base.out_channels, 1, 1, bias=False)
        _init_pair(self.lora_A.weight, self.lora_B.weight, init, r)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = _match_input_dtype(x, self.lora_A.weight)
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight  # (r, in, kh, kw), (out, r, 1, 1)
        return F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * self.scaling  # (out, in, kh, kw)


class LoraTuner(LayerTuner):
    """Attaches :class:`LoraConfig` adapters: one LoRA layer per target module."""

    supported = (nn.Linear, Conv1D, nn.Embedding, nn.Conv2d)
    default_targets = LORA_DEFAULT_TARGETS
    mergeable = True

    def check_layer(self, module: nn.Module, path: str) -> None:
        r, _ = self.config.rank_and_alpha(path)
        sizes = _layer_sizes(module)
        if sizes is not None and r > min(sizes):
            raise ValueError(
                f"LoraConfig: r={r} is more than {path} ({type(module).__name__}, input {sizes[0]}, output {sizes[1]}) "
                f"allows: B A has rank at most {min(sizes)}, the smaller size. Lower r, or give this layer its own rank "
                "with rank_pattern."
            )

    def make_layer(self, module: nn.Module, path: str) -> AdapterLayer:
        c = self.config
        r, alpha = c.rank_and_alpha(path)
        if c.use_dora and not isinstance(module, (nn.Linear, Conv1D)):
            raise ValueError(
                f"LoraConfig(use_dora=True) supports Linear and Conv1D layers, but {path} is a {type(module).__name__}. "
                "Exclude it with exclude_modules, or narrow target_modules."
            )
        if isinstance(module, nn.Embedding):
            return LoraEmbedding(module, r, alpha, c.lora_dropout, c.use_rslora, c.init_lora_weights)
        if isinstance(module, nn.Conv2d):
            return LoraConv2d(module, r, alpha, c.lora_dropout, c.use_rslora, c.init_lora_weights)
        transposed = isinstance(module, Conv1D)
        if c.fan_in_fan_out is not None and c.fan_in_fan_out != transposed:
            raise ValueError(
                f"LoraConfig: fan_in_fan_out={c.fan_in_fan_out} but {path} is a {type(module).__name__}, whose weight is "
                f"stored {'(in, out)' if transposed else '(out, in)'}. Leave fan_in_fan_out=None to decide per layer."
            )
        if c.use_dora:
            from .dora import DoraLinear  # dora.py builds on LoraLinear, so it imports this module, not the reverse

            return DoraLinear(module, r, alpha, c.lora_dropout, c.use_rslora, c.init_lora_weights, transposed)
        return LoraLinear(module, r, alpha, c.lora_dropout, c.use_rslora, c.init_lora_weights, transposed)

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """Fold the adapter (:meth:`LoraLinear.fold`) for one ``generate()`` call: every new token then costs
        what it costs on the merged model, for one temporary copy of each adapted weight; the base weights are
        not touched, so nothing needs undoing but dropping the copies. Layers with active dropout (training
        mode), DoRA, non-linear layers and quantized base layers (a folded copy would be a full-precision
        weight, the memory quantizing saved) run unmerged as usual."""
        folded = []
        try:
            for path, layer in self.layers():
                base = get_submodule(self.model, path)
                if type(layer) is LoraLinear and not layer.dropout_active() and not is_quantized_linear(base):
                    layer.fold(base)
                    folded.append(layer)
            yield
        finally:
            for layer in folded:
                layer.unfold()

    def config_dict(self) -> dict:
        d = super().config_dict()
        d["target_modules"] = self.target_modules()
        d["fan_in_fan_out"] = any(isinstance(get_submodule(self.model, p), Conv1D) for p in self.paths)
        return d

    # --- bias="all" / "lora_only": base biases that train (and are saved) with the adapter -----------
    # Trained biases live in the base model, so such an adapter needs the model to itself, cannot serve
    # some rows of a mixed batch, and keeps the original biases to show (disable) or restore (unload).
    @classmethod
    def is_exclusive(cls, config: LoraConfig) -> bool:
        return config.bias != "none"

    def __init__(self, peft_model, name: str, config: LoraConfig) -> None:
        super().__init__(peft_model, name, config)
        self.mixed_batch = config.bias == "none"
        self._bias_originals = {n: p.detach().clone() for n, p in self._biases().items()}

    def _swap_biases(self) -> None:
        for n, p in self._biases().items():
            p.data, self._bias_originals[n] = self._bias_originals[n], p.data

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        self._swap_biases()
        try:
            yield
        finally:
            self._swap_biases()

    def remove(self) -> None:
        if not self.merged:  # merge_and_unload keeps the trained biases; unload restores the originals
            self._swap_biases()
        self._bias_originals.clear()
        super().remove()

    def _biases(self) -> dict[str, nn.Parameter]:
        if self.config.bias == "none":
            return {}
        if self.config.bias == "all":
            return {n: p for n, p in self.model.named_parameters() if n.endswith(".bias") and ".adapters." not in n}
        found = {}
        for path, layer in self.layers():
            bias = getattr(get_submodule(self.model, path), "bias", None) if not isinstance(layer, ModuleCopy) else None
            if isinstance(bias, nn.Parameter):
                found[f"{path}.base_layer.bias"] = bias
        return found

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return super().named_parameters() + list(self._biases().items())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **{HF_PREFIX + n: p for n, p in self._biases().items()}}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        biases = {HF_PREFIX + n: p for n, p in self._biases().items()}
        for key, param in biases.items():
            if key not in tensors:
                raise KeyError(f"{source}: missing {key!r} (the adapter trains biases: bias={self.config.bias!r}).")
            if tensors[key].shape != param.shape:
                raise ValueError(f"{source}: {key!r} has shape {tuple(tensors[key].shape)}, the model expects {tuple(param.shape)}.")
        super().load_state_dict({k: v for k, v in tensors.items() if k not in biases}, source)
        with torch.no_grad():
            for key, param in biases.items():
                param.copy_(tensors[key].to(param.dtype))



def _old_lora_options(values: dict[str, Any]) -> dict[str, Any]:
    """Read the names of peftkit 0.x (``rank``, ``alpha``, ``dropout``; alpha then defaulted to 2 x rank) for
    one more release, with a warning. Removed in the next release."""
    from ..options import coerce
    from ..registry import warn

    values = dict(values)
    old = {k: values.pop(k) for k in ("rank", "alpha", "dropout") if k in values}
    for name, new in (("rank", "r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
        if name in old:
            if new in values:
                raise ValueError(f"Both {name!r} and {new!r} are set; keep {new!r} (peft's name).")
            warn(f"the option {name!r} (--{name}) is deprecated and goes away in the next release; use {new!r} (--{new.replace('_', '-')}).")
            values[new] = old[name]
    if "rank" in old and "alpha" not in old and "lora_alpha" not in values:
        # The old default: alpha = 2 x rank. Kept for the old name only, so an old command gives the same model.
        values["lora_alpha"] = 2 * coerce(old["rank"], int, "rank")
        warn("with the old 'rank' option, lora_alpha stays 2 x rank as before; with 'r' lora_alpha is its own setting "
             "(the lora and dora presets default to 16 = 2 x the default r).")
    return values


LEGACY_LORA_OPTIONS = dict.fromkeys(("rank", "alpha", "dropout"), _old_lora_options)

register(
    LoraConfig,
    LoraTuner,
    # The command line's LoRA defaults differ from LoraConfig's (which keep peft's, for the Python API): every
    # linear layer (attention and MLP, never the output head), r=8, lora_alpha 16 (scale 2), lr 1e-3. On DialogSum
    # (40 steps of 4 dev rows, 40 test rows, docs/results/defaults/) this scored ROUGE-1 0.438 against 0.283 for
    # q/v at 2e-4 and 0.364 for q/v at 1e-3; r=16 and lr 2e-3 scored the same within noise (0.443). As the QLoRA
    # paper and "LoRA Without Regret" report: all linear layers, and about 10x full fine-tuning's learning rate.
    Preset("lora", "LoRA: frozen W plus a trained low-rank update (lora_alpha/r) B A on every linear layer",
           default_lr=1e-3, defaults={"lora_alpha": 16, "target_modules": "all-linear"}, fixed={"use_dora": False},
           legacy=LEGACY_LORA_OPTIONS),
)
