"""The layer-level contract, and the one tuner all layer-level methods (LoRA, IA3, bottleneck) share.

A layer method provides a config, a default-target table and :class:`AdapterLayer` subclasses; the
generic :class:`LayerTuner` finds targets, wraps them in hosts, names tensors for the file format,
merges, and removes. The method file only says what is specific to it (``make_layer``).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PeftConfig
from ..inject import (
    find_targets,
    get_submodule,
    host_for,
    hosts,
    model_type,
    name_matches,
    named_base_modules,
    release_host,
)
from ..io.keys import HF_PREFIX, to_hf_key
from ..model import infer_task_type
from ..tuner import Tuner

# The freshly initialised output layer of each task's model class, by the names transformers gives it
# (``BertForSequenceClassification.classifier``, ``LlamaForSequenceClassification.score``). As in ``peft``,
# an adapter for such a task trains and saves this head in full (``modules_to_save``): without it the
# classifier would keep its random weights.
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


class AdapterLayer(nn.Module):
    """One named adapter inside an :class:`~peftkit.inject.AdapterHost`.

    ``forward(x, base)`` returns the adapted output, where ``base`` is the frozen module (callable).
    Additive adapters only define ``delta(x)``: ``forward = base(x) + delta(x)``.
    Mergeable adapters define ``delta_weight()``-based ``merge(base_layer)`` / ``unmerge(base_layer)``.
    """

    additive: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    # Reads the base weight's values beyond ``base(x)`` (DoRA's row norms): it must stay in full precision
    # while training, see :func:`peftkit.precision.store_frozen_linear_weights_in_bf16`.
    reads_base_weight: ClassVar[bool] = False

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        if not self.additive:
            raise NotImplementedError(f"{type(self).__name__} must define forward(x, base)")
        out = base(x)
        return out + self.delta(x).to(out.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not additive")

    def merge(self, base_layer: nn.Module) -> None:
        raise TypeError(f"{type(self).__name__} cannot be merged into the base weights.")

    def unmerge(self, base_layer: nn.Module) -> None:
        raise TypeError(f"{type(self).__name__} cannot be merged into the base weights.")

    # Tensor names as the Hugging Face PEFT file spells them (relative to the wrapped module).
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items()}

    def hf_to_local(self, key: str) -> str:
        return key



class DeltaWeightLayer(AdapterLayer):
    """An additive layer whose update has a weight form, ``delta_weight()`` (LoRA, AdaLoRA): the one source of
    merge (``W += delta``) and unmerge (``W -= delta``)."""

    additive = True
    mergeable = True

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, base_layer: nn.Module) -> None:
        base_layer.weight.data += self.delta_weight().to(base_layer.weight.dtype)

    @torch.no_grad()
    def unmerge(self, base_layer: nn.Module) -> None:
        base_layer.weight.data -= self.delta_weight().to(base_layer.weight.dtype)

class ModuleCopy(AdapterLayer):
    """``modules_to_save``: a trainable full copy of a module (e.g. a classifier head) used instead of it."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(base_layer)
        for p in self.module.parameters():
            p.requires_grad_(True)

    def forward(self, x: torch.Tensor, base) -> torch.Tensor:
        return self.module(x)

    # Merging swaps the trained and the original tensors; swapping again undoes it exactly.
    def merge(self, base_layer: nn.Module) -> None:
        self._swap(base_layer)

    def unmerge(self, base_layer: nn.Module) -> None:
        self._swap(base_layer)

    @torch.no_grad()
    def _swap(self, base_layer: nn.Module) -> None:
        mine = dict(self.module.named_parameters())
        for name, theirs in base_layer.named_parameters():
            theirs.data, mine[name].data = mine[name].data, theirs.data

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict())

    def hf_to_local(self, key: str) -> str:
        return "module." + key


class LayerTuner(Tuner):
    """A named adapter made of :class:`AdapterLayer` s placed in hosts around target modules.

    Subclasses set ``supported`` (base module types), ``default_targets`` (``model_type`` -> module
    names) and implement ``make_layer(module, path)``. The config needs ``target_modules``,
    ``exclude_modules`` and ``modules_to_save`` fields.
    """

    supported: ClassVar[tuple[type[nn.Module], ...]] = ()
    default_targets: ClassVar[dict[str, list[str]]] = {}
    mixed_batch = True

    def __init__(self, peft_model, name: str, config: PeftConfig) -> None:
        super().__init__(peft_model, name, config)
        copies = self._modules_to_save_paths()
        # As in ``peft``, a module trained in full is never also a target, nor is anything inside it (the
        # ``dense``/``out_proj`` of RoBERTa's classification head under "all-linear").
        targets = [t for t in self.find_targets() if not any(t == c or t.startswith(c + ".") for c in copies)]
        # Check every target, then build every layer, before touching the model: a failure leaves it
        # unchanged, and a size no layer can take is refused before anything is allocated.
        for path in targets:
            self.check_layer(get_submodule(self.model, path), path)
        layers = {path: self.make_layer(get_submodule(self.model, path), path) for path in targets}
        for path in copies:
            layers[path] = ModuleCopy(get_submodule(self.model, path))
        for path, layer in layers.items():
            base = get_submodule(self.model, path)
            ref = next(base.parameters(), None)
            if ref is not None:
                layer.to(ref.device)
            host_for(self.model, path, peft_model.routing).adapters[name] = layer
        self.paths = list(layers)

    # --- what a method file provides -------------------------------------------------------------
    def make_layer(self, module: nn.Module, path: str) -> AdapterLayer:
        raise NotImplementedError

    def check_layer(self, module: nn.Module, path: str) -> None:
        """Raise a ValueError if the config cannot fit ``module`` (called for every target before any
        ``make_layer``, so nothing is allocated for a config that fails)."""

    def target_modules(self) -> Any:
        targets = self.config.target_modules
        if targets is None:
            kind = model_type(self.model)
            if kind not in self.default_targets:
                raise ValueError(
                    f"{type(self.config).__name__}: no default target_modules for model type {kind!r}; "
                    f"set target_modules (defaults exist for {sorted(self.default_targets)})."
                )
            targets = self.default_targets[kind]
        return targets

    # --- generic machinery -----------------------------------------------------------------------
    def find_targets(self) -> list[str]:
        return find_targets(
            self.model,
            self.target_modules(),
            getattr(self.config, "exclude_modules", None),
            self.supported,
            type(self.config).__name__,
        )

    def modules_to_save(self) -> list[str] | None:
        """The config's ``modules_to_save`` plus, for a classification or QA model, its task head
        (:data:`TASK_HEADS`), which ``peft`` adds the same way. The config object itself is not changed."""
        names = list(getattr(self.config, "modules_to_save", None) or [])
        task = self.config.task_type or infer_task_type(self.model)
        extra = [h for h in TASK_HEADS.get(task, ()) if h not in names]
        if not hasattr(self.config, "modules_to_save") or not (names or extra):
            return getattr(self.config, "modules_to_save", None)
        return names + extra

    def _modules_to_save_paths(self) -> list[str]:
        names = getattr(self.config, "modules_to_save", None) or []
        heads = [h for h in (self.modules_to_save() or []) if h not in names]
        modules = [n for n, _ in named_base_modules(self.model)]
        paths = [n for n in modules if name_matches(n, list(names) + heads)]
        if names and not any(name_matches(n, list(names)) for n in modules):
            raise ValueError(f"modules_to_save={names!r} matches no module of {type(self.model).__name__}.")
        # A head inside a head (never in transformers' classes) would be copied twice: keep the outer one.
        return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]

    def config_dict(self) -> dict[str, Any]:
        d = super().config_dict()
        if "modules_to_save" in d:
            d["modules_to_save"] = self.modules_to_save()
        return d

    def layers(self) -> list[tuple[str, AdapterLayer]]:
        return [(path, host.adapters[self.name]) for path, host in hosts(self.model) if self.name in host.adapters]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [
            (f"{path}.adapters.{self.name}.{n}", p) for path, layer in self.layers() for n, p in layer.named_parameters()
        ]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._layer_state_dict()

    def _layer_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            to_hf_key(path, key): tensor
            for path, layer in self.layers()
            for key, tensor in layer.hf_state_dict().items()
        }

    def load_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        layers = dict(self.layers())
        plan: list[tuple[torch.Tensor, torch.Tensor]] = []
        expected = set(self._layer_state_dict())
        for key, value in tensors.items():
            path, local = self._split_key(key, layers, source)
            if local.startswith("base_layer."):
                self._check_base_copy(key, path, local.removeprefix("base_layer."), value, source)
                continue
            target = layers[path].state_dict(keep_vars=True).get(layers[path].hf_to_local(local))
            if target is None:
                raise KeyError(f"{source}: {key!r} names no tensor of the adapter at {path!r}.")
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(
                    f"{source}: {key!r} has shape {tuple(value.shape)} but the model expects {tuple(target.shape)}. "
                    "The adapter was most likely trained on a different base model (or with a different rank)."
                )
            plan.append((target, value))
            expected.discard(key)
        if expected:
            missing = sorted(expected)
            raise KeyError(f"{source}: missing {len(missing)} tensor(s) the adapter needs, e.g. {missing[:3]}.")
        with torch.no_grad():
            for target, value in plan:
                target.copy_(value.to(dtype=target.dtype, device=target.device))

    def _check_base_copy(self, key: str, path: str, name: str, value: torch.Tensor, source: str) -> None:
        """``peft`` saves the base weights of adapted embeddings too (``save_embedding_layers``). A copy
        equal to our base changes nothing; a different one means another vocabulary, which we refuse
        rather than overwrite the frozen base."""
        base = get_submodule(self.model, path).state_dict().get(name)
        if base is None or base.shape != value.shape or not torch.equal(base, value.to(base.dtype)):
            raise ValueError(
                f"{source}: {key!r} carries base weights that differ from this model's "
                f"({tuple(value.shape)} vs {None if base is None else tuple(base.shape)}); the adapter was saved "
                "with modified embeddings (e.g. added tokens). Load it on the base model it was trained with."
            )

    @staticmethod
    def _split_key(key: str, layers: dict[str, AdapterLayer], source: str) -> tuple[str, str]:
        """``base_model.model.<path>.<tensor>`` -> (path, tensor), choosing the longest matching path."""
        if not key.startswith(HF_PREFIX):
            raise KeyError(f"{source}: key {key!r} does not start with {HF_PREFIX!r}.")
        rest = key[len(HF_PREFIX):]
        parts = rest.split(".")
        for i in range(len(parts) - 1, 0, -1):
            path = ".".join(parts[:i])
            if path in layers:
                return path, ".".join(parts[i:])
        raise KeyError(
            f"{source}: {key!r} matches no module this adapter targets "
            f"(targets: {sorted(layers)[:4]}{' ...' if len(layers) > 4 else ''}). "
            "Was the adapter trained on a different base model?"
        )

    def remove(self) -> None:
        """Take this adapter's layers out; hosts left empty give their place back to the base module.
        Weights that were merged stay merged (that is what ``merge_and_unload`` relies on)."""
        for path, host in list(hosts(self.model)):
            if self.name in host.adapters:
                del host.adapters[self.name]
                if self.name in host.merged:
                    host.merged.remove(self.name)
            if len(host.adapters) == 0:
                release_host(self.model, path)

    def merge(self) -> None:
        if not self.mergeable:
            super().merge()
        for _, host in hosts(self.model):
            host.merge(self.name)

    def unmerge(self) -> None:
        for _, host in hosts(self.model):
            host.unmerge(self.name)

    @property
    def merged(self) -> bool:
        return any(self.name in host.merged for _, host in hosts(self.model))



class InPlaceTuner(Tuner):
    """An adapter made of the base model's own parameters, trained in place (selective, full).

    Subclasses set ``self.params`` (name in the model -> parameter). On disk each is
    ``base_model.model.<name>``. Such a method needs the model to itself (``exclusive``), and merging
    only records that the trained values are to stay when the adapter is removed.
    """

    exclusive = True
    mergeable = True
    file_holds: ClassVar[str] = "exactly the parameters this config selects"

    def __init__(self, peft_model, name: str, config: PeftConfig) -> None:
        super().__init__(peft_model, name, config)
        self.params: dict[str, nn.Parameter] = {}
        self.merged = False

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.params.items())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {HF_PREFIX + n: p.detach() for n, p in self.params.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        own = self.state_dict()
        unknown, missing = sorted(set(tensors) - set(own)), sorted(set(own) - set(tensors))
        if unknown or missing:
            raise KeyError(
                f"{source}: the file must hold {self.file_holds} "
                f"(unknown here: {unknown[:3]}, missing from the file: {missing[:3]}). "
                "Was it trained on a different base model?"
            )
        for key, value in tensors.items():
            if value.shape != own[key].shape:
                raise ValueError(
                    f"{source}: {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)} "
                    "(a different base model?)."
                )
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value.to(dtype=own[key].dtype, device=own[key].device))

    def merge(self) -> None:
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False
