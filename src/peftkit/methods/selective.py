r"""Selective fine-tuning: train a chosen subset of the model's own parameters, freeze the rest.

Examples of the family, all one :class:`SelectiveConfig`:

* BitFit (Ben Zaken et al., 2021, https://arxiv.org/abs/2106.10199): only the biases,
  ``patterns=[r"\.bias$"]``. Models without biases (T5, Llama) have nothing to train and are refused.
* LayerNorm tuning (Zhao et al., 2023, https://arxiv.org/abs/2312.11420): only the normalization
  layers' gains (and biases, where they have them).
* The last N layers (``layers=[-2, -1]``): every parameter of the top blocks of each layer stack.

Nothing is added to the model: a selected parameter ``w`` (any shape) is trained in place, so the
forward pass costs exactly what the base model costs. The saved adapter holds the selected tensors
only, under ``base_model.model.<parameter name>``.

Because it changes base weights, the tuner keeps a copy of the original values of the selected
tensors (small: 0.1% of a model for BitFit). That copy is what makes the usual adapter contract hold:
``disable_adapter()`` swaps the originals in for its duration, and ``unload()`` (or deleting the
adapter) puts them back bit for bit. ``merge_adapter()`` has nothing to fold in: it only records that
the trained values are now *the* base weights, so ``merge_and_unload()`` returns the model with them
and drops the copy.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..config import PeftConfig
from ..registry import Preset, register
from .base import InPlaceTuner

# The index of the repeated block a parameter belongs to: ``model.layers.3.``, ``transformer.h.3.``,
# ``encoder.block.3.``, ``encoder.layer.3.``. The leftmost match wins, so T5's ``block.3.layer.1.``
# belongs to block 3 (``layer.1`` is a sub-layer inside the block).
LAYER_INDEX = re.compile(r"(?:^|\.)(layers|layer|h|block|blocks)\.(\d+)\.")

BIAS_PATTERNS = [r"\.bias$"]
NORM_PATTERNS = [r"(?i)(norm[^.]*|ln_[^.]*)\.(weight|bias)$"]  # LayerNorm, layer_norm, RMSNorm, ln_1, ln_f ...


@dataclass
class SelectiveConfig(PeftConfig):
    """Configuration of selective fine-tuning: which of the model's own parameters train.

    Args:
        patterns: Regexes searched (``re.search``) in each parameter's name, e.g. ``[r"\\.bias$"]``
            for BitFit; a parameter trains if any pattern matches. ``None`` means every parameter,
            which is only allowed together with ``layers`` (otherwise use ``FullConfig``).
        layers: Indices of the blocks the selection is limited to, counted per layer stack (an
            encoder-decoder model has two). Negative indices count from the end: ``[-1]`` is the
            last block of each stack. Parameters outside the blocks (embeddings, final norm, head)
            are then left out. ``None`` means no limit.
    """

    peft_type: ClassVar[str] = "SELECTIVE"

    patterns: list[str] | None = None
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patterns is not None:
            if isinstance(self.patterns, str) or not self.patterns or not all(isinstance(p, str) for p in self.patterns):
                raise ValueError(f"SelectiveConfig: patterns must be a non-empty list of regexes, got {self.patterns!r}.")
            self.patterns = list(self.patterns)
            for pattern in self.patterns:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"SelectiveConfig: pattern {pattern!r} is not a valid regex ({e}).") from None
        if self.layers is not None:
            if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ValueError(f"SelectiveConfig: layers must be a non-empty list of integers, got {self.layers!r}.")
            self.layers = list(self.layers)
        if self.patterns is None and self.layers is None:
            raise ValueError(
                "SelectiveConfig: set patterns (e.g. [r'\\.bias$'] for BitFit) or layers (e.g. [-1] for the last "
                "block); with neither it would train the whole model, which is FullConfig()."
            )


def select_parameters(model: nn.Module, config: SelectiveConfig) -> list[tuple[str, nn.Parameter]]:
    """The parameters ``config`` selects, in model order. Raises with examples of the model's parameter
    names when nothing matches, and when a layer index exists in no layer stack."""
    params = list(model.named_parameters())
    where = {name: LAYER_INDEX.search(name) for name, _ in params}
    stacks: dict[str, int] = {}  # stack prefix ("model.layers") -> number of blocks
    for name, m in where.items():
        if m is not None:
            stack = name[: m.start(2) - 1]
            stacks[stack] = max(stacks.get(stack, 0), int(m.group(2)) + 1)

    if config.layers is not None:
        # per stack, the block indices asked for (negative ones counted from that stack's end)
        wanted = {s: {i % n for i in config.layers if -n <= i < n} for s, n in stacks.items()}
        missing = [i for i in config.layers if not any(-n <= i < n for n in stacks.values())]
        if missing:
            sizes = ", ".join(f"{s} ({n})" for s, n in stacks.items()) or "none found"
            raise ValueError(f"SelectiveConfig: layers {missing} do not exist in any layer stack of the model: {sizes}.")

    def in_layers(name: str) -> bool:
        m = where[name]
        return config.layers is None or (m is not None and int(m.group(2)) in wanted[name[: m.start(2) - 1]])

    found = [(n, p) for n, p in params if in_layers(n) and (config.patterns is None or any(re.search(r, n) for r in config.patterns))]
    if not found:
        shapes = list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", n) for n, _ in params))
        raise ValueError(
            f"SelectiveConfig(patterns={config.patterns!r}, layers={config.layers!r}) selects no parameter of "
            f"{type(model).__name__}, so there would be nothing to train (BitFit, for example, needs biases, which "
            f"T5 and Llama do not have). Its parameters are named like: {', '.join(shapes[:12])}"
            f"{' ...' if len(shapes) > 12 else ''}."
        )
    return found


class SelectiveTuner(InPlaceTuner):
    """Trains the selected base parameters in place; keeps their original values to restore them."""

    def __init__(self, peft_model, name: str, config: SelectiveConfig) -> None:
        super().__init__(peft_model, name, config)
        self.params = dict(select_parameters(self.model, config))
        self.originals = {n: p.detach().clone() for n, p in self.params.items()}
        self._showing_originals = False

    def _swap(self) -> None:
        """Exchange trained and original values (no copy: the two tensors change places)."""
        for n, p in self.params.items():
            p.data, self.originals[n] = self.originals[n].to(p.device), p.data

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        if self._showing_originals:  # nested disable_adapter(): the originals are in place already
            yield
            return
        self._swap()
        self._showing_originals = True
        try:
            yield
        finally:
            self._swap()
            self._showing_originals = False

    def remove(self) -> None:
        """Put the original values back (bit for bit), unless merged, then freeze the parameters again."""
        if not self.merged:
            self._swap()
        for p in self.params.values():
            p.requires_grad_(False)
        self.originals.clear()


register(
    SelectiveConfig,
    SelectiveTuner,
    Preset("bitfit", "BitFit: train only the biases (refused on models without biases, e.g. T5 and Llama)",
           default_lr=1e-3, fixed={"patterns": BIAS_PATTERNS}),
    Preset("norm", "LayerNorm/RMSNorm tuning: train only the normalization gains (and biases)",
           default_lr=1e-3, fixed={"patterns": NORM_PATTERNS}),
    Preset("last_layers", "Train every parameter of the last blocks of each layer stack (--layers -2,-1 for two; "
           "default the last)", default_lr=5e-5, fixed={"patterns": None}, defaults={"layers": [-1]}),
    Preset("selective", "Train the parameters whose names match --patterns (regexes), optionally only in --layers",
           default_lr=1e-4),
)
