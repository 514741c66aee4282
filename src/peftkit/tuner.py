"""The model-level contract every method implements, and the routing state adapters read.

A :class:`Tuner` is one *named adapter* attached to a model: the LoRA adapter "summarize", the IA3
adapter "translate", a soft prompt. :class:`peftkit.PeftModel` keeps one per name and only ever talks
to them through this small interface, so adding a method never means editing the model wrapper.

Layer-level methods (LoRA, IA3, bottleneck adapters) share one implementation of this contract,
:class:`peftkit.methods.base.LayerTuner`; soft prompts and selective fine-tuning implement it directly.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .config import PeftConfig

if TYPE_CHECKING:
    from .model import PeftModel

BASE = "__base__"  # the adapter name that means "no adapter" in a mixed batch


class Routing:
    """Which adapter runs, shared by every adapter host of one model.

    ``set_adapter`` changes one attribute here, which is why switching adapters costs microseconds.
    ``rows`` (one adapter name per batch row) is set only for the duration of a mixed-batch call.
    """

    __slots__ = ("active", "enabled", "rows", "_groups")

    def __init__(self) -> None:
        self.active: str | None = None
        self.enabled: bool = True
        self.rows: list[str] | None = None
        self._groups: dict[tuple, Any] = {}  # row groups and row index per (batch size, device), for one call

    def set_rows(self, rows: list[str] | None) -> None:
        self.rows = rows
        self._groups = {}

    @contextlib.contextmanager
    def only(self, name: str) -> Iterator[None]:
        """Every row is ``name``'s inside the block. A host that runs one row group through its base module
        uses it, so that hosts nested in that module (LoRA on ``mlp.down_proj`` inside a host of ``mlp``)
        treat the sub-batch as that adapter's rows instead of mismatching the full ``rows`` list."""
        saved = self.rows, self._groups
        self.rows, self._groups = [name], {}
        try:
            yield
        finally:
            self.rows, self._groups = saved

    def row_groups(self, batch_size: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """``[(adapter_name, row_indices), ...]`` for a batch of ``batch_size`` rows.

        A batch may be a whole multiple of ``len(rows)``: generation repeats each row for beams or
        returned sequences (``repeat_interleave``), so row ``i`` of the request covers rows
        ``i*k .. i*k+k-1`` of the expanded batch.
        """
        key = (batch_size, device)
        groups = self._groups.get(key)
        if groups is None:
            assert self.rows is not None
            n = len(self.rows)
            if batch_size % n:
                raise ValueError(
                    f"adapter_names has {n} entries but a layer received a batch of {batch_size} rows; "
                    "give one adapter name per input row."
                )
            repeat = batch_size // n
            by_name: dict[str, list[int]] = {}
            for i, name in enumerate(self.rows):
                by_name.setdefault(name, []).extend(range(i * repeat, (i + 1) * repeat))
            groups = [(name, torch.tensor(idx, device=device)) for name, idx in by_name.items()]
            self._groups[key] = groups
        return groups

    def row_index(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """(batch_size,) long: for each row, the position of its group in :meth:`row_groups`. Computed once
        per call (not per layer): batched kernels select each row's adapter with it."""
        key = ("index", batch_size, device)
        index = self._groups.get(key)
        if index is None:
            index = torch.empty(batch_size, dtype=torch.long)
            for i, (_, rows) in enumerate(self.row_groups(batch_size, device)):
                index[rows.cpu()] = i
            index = self._groups[key] = index.to(device)
        return index


class Tuner(ABC):
    """One named adapter on a model. Subclasses attach themselves in ``__init__``.

    Contract (all a :class:`PeftModel` needs):
        ``named_parameters()``  the parameters this adapter trains,
        ``state_dict()`` / ``load_state_dict()``  its tensors under Hugging Face PEFT file keys,
        ``remove()``  detach it and leave the model as it found it,
        ``merge()`` / ``unmerge()``  fold into / out of the base weights (``mergeable`` methods only),
        ``prepare_inputs()``  change the model inputs (soft prompts only),
        ``disabled()``  a context in which the model computes as the bare base model,
        ``generation()``  a context around one ``generate()`` call (precompute what stays fixed),
        ``config_dict()``  what ``adapter_config.json`` stores.
    """

    mergeable: ClassVar[bool] = False
    """Can be folded into the base weights, leaving a model of the original size and latency."""
    mixed_batch: ClassVar[bool] = False
    """Can serve some rows of a batch while other rows use another adapter."""
    exclusive: ClassVar[bool] = False
    """Changes the base model itself (selective/full fine-tuning): cannot share a model with other adapters."""

    @classmethod
    def is_exclusive(cls, config: PeftConfig) -> bool:
        """Whether an adapter with this config changes the base model itself (and so needs it alone)."""
        return cls.exclusive

    def __init__(self, peft_model: "PeftModel", name: str, config: PeftConfig) -> None:
        self.peft_model = peft_model
        self.name = name
        self.config = config

    @property
    def model(self) -> nn.Module:
        """The base model the adapter is attached to."""
        return self.peft_model.get_base_model()

    @abstractmethod
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters this adapter trains, with their names in the wrapped model."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """This adapter's tensors, keyed as in the Hugging Face PEFT ``adapter_model.safetensors``."""

    @abstractmethod
    def load_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load tensors keyed as on disk. Checks every key and shape before writing any (nothing half-loaded)."""

    @abstractmethod
    def remove(self) -> None:
        """Detach this adapter from the model."""

    def merge(self) -> None:
        raise TypeError(f"{type(self.config).__name__} adapters cannot be merged into the base weights.")

    def unmerge(self) -> None:
        raise TypeError(f"{type(self.config).__name__} adapters cannot be merged into the base weights.")

    def prepare_inputs(self, kwargs: dict[str, Any], for_generate: bool = False) -> dict[str, Any]:
        """Change the model's keyword inputs before a forward/generate call (soft prompts)."""
        return kwargs

    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """A context in which the model computes as the bare base model (``PeftModel.disable_adapter``).

        Nothing to do for methods that live outside the base weights: ``Routing.enabled`` bypasses their
        layers and inputs. Methods that train base weights in place swap the originals in (selective) or
        refuse (full fine-tuning, which keeps no copy).
        """
        return contextlib.nullcontext()

    def generation(self) -> contextlib.AbstractContextManager[None]:
        """A context around one ``PeftModel.generate()`` call with this adapter active for every row. The
        weights stay fixed for all the tokens of the call, so a method may precompute from them here (LoRA
        folds ``W + s B A``); it must leave everything as it was on exit. Default: nothing."""
        return contextlib.nullcontext()

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()
