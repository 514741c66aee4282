"""Finding target modules and wrapping them in adapter hosts. Knows nothing about any one method.

An :class:`AdapterHost` takes the place of a base module (``q_proj`` becomes a host whose
``base_layer`` is the original ``nn.Linear``) and holds any number of named adapters of any
layer-level method. Parameter paths therefore look like ``peft``'s:
``...q_proj.base_layer.weight`` and ``...q_proj.adapters.<name>.lora_A.weight``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .tuner import BASE, Routing

try:  # GPT-2 style layers: a Linear with its weight stored transposed (in_features, out_features).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but peftkit works on plain nn.Modules
    class Conv1D(nn.Module):  # type: ignore[no-redef]
        pass

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


class AdapterHost(nn.Module):
    """Stands in for one base module and runs the adapter that :class:`Routing` selects.

    ``forward(x, *args, **kwargs)`` calls ``base_layer`` alone when no adapter applies here (adapter
    disabled, merged, or one that targets other modules), the active adapter otherwise, and in a
    mixed batch each group of rows with its own adapter.
    """

    def __init__(self, base_layer: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.routing = routing
        self.merged: list[str] = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = self.routing
        if routing.rows is not None:
            return self._forward_mixed(x, args, kwargs)
        name = routing.active
        if not routing.enabled or name is None or name in self.merged or name not in self.adapters:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer if not (args or kwargs) else (lambda inp: self.base_layer(inp, *args, **kwargs))
        return self.adapters[name](x, base)

    def _forward_mixed(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        base = self.base_layer if not (args or kwargs) else (lambda inp: self.base_layer(inp, *args, **kwargs))
        groups = self.routing.row_groups(x.shape[0], x.device)
        adapters = self.adapters
        layers = [adapters[name] if name != BASE and name in adapters else None for name, _ in groups]
        present = [layer for layer in layers if layer is not None]
        out = base(x)
        if not present:
            return out
        kind = type(present[0])
        batched = getattr(kind, "mixed_delta", None)
        if batched is not None and all(type(layer) is kind for layer in present):  # one batched kernel for all groups
            return out + batched(layers, x, groups, self.routing.row_index(x.shape[0], x.device)).to(out.dtype)
        for layer, (name, rows) in zip(layers, groups):
            if layer is None:
                continue
            with self.routing.only(name):  # hosts nested inside base_layer see these rows as one group
                rows_out = layer(x.index_select(0, rows), base)
            out = out.index_copy(0, rows, rows_out.to(out.dtype))
        return out

    def merge(self, name: str) -> None:
        if name in self.merged or name not in self.adapters:
            return
        if self.merged:
            raise RuntimeError(f"Adapter {self.merged[0]!r} is already merged here; unmerge it before merging {name!r}.")
        if type(self.base_layer).__module__.startswith("bitsandbytes"):
            raise RuntimeError(
                f"Adapter {name!r} cannot be merged in place into a quantized {type(self.base_layer).__name__}: adding "
                "the update to 4/8-bit weights rounds most of it away, and unmerging could not undo that. Use "
                "merge_and_unload(), which dequantizes the base and merges in fp32 (requantize=True quantizes the "
                "merged model again)."
            )
        self.adapters[name].merge(self.base_layer)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        self.adapters[name].unmerge(self.base_layer)
        self.merged.remove(name)

    def __getattr__(self, name: str) -> Any:
        # Model code reads attributes of the module it expects (``.weight``, ``.in_features``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            return getattr(self._modules["base_layer"], name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, merged={self.merged}"


# --- walking the model -----------------------------------------------------------------------------
def named_base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` as the user sees the model: hosts appear as the module they wrap, and
    adapter internals are skipped, so names stay ``layers.0.self_attn.q_proj`` once adapters exist."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, AdapterHost):
                yield path, child.base_layer
                yield from walk(child.base_layer, path)
            else:
                yield path, child
                yield from walk(child, path)

    yield from walk(model, "")


def hosts(model: nn.Module) -> Iterator[tuple[str, AdapterHost]]:
    """Every adapter host with its logical path (the path of the module it wraps). A host may sit inside
    another host's module (LoRA on ``mlp.down_proj`` while a bottleneck adapter wraps ``mlp``): its path
    stays ``mlp.down_proj``, without the outer host's ``base_layer``."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, AdapterHost]]:
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, AdapterHost):
                yield path, child
                yield from walk(child.base_layer, path)
            else:
                yield from walk(child, path)

    yield from walk(model, "")


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    module = model.get_submodule(path) if path else model
    return module.base_layer if isinstance(module, AdapterHost) else module


def host_for(model: nn.Module, path: str, routing: Routing) -> AdapterHost:
    """The host at ``path``, wrapping the module there first if it has none."""
    parent_path, _, child = path.rpartition(".")
    parent = get_submodule(model, parent_path)  # inside a host, the module it wraps (not the host itself)
    module = getattr(parent, child)
    if isinstance(module, AdapterHost):
        return module
    host = AdapterHost(module, routing)
    setattr(parent, child, host)
    return host


def release_host(model: nn.Module, path: str) -> None:
    """Put the original module back in place of an (empty) host."""
    parent_path, _, child = path.rpartition(".")
    parent = get_submodule(model, parent_path)
    host = getattr(parent, child)
    if isinstance(host, AdapterHost):
        setattr(parent, child, host.base_layer)


# --- choosing targets ------------------------------------------------------------------------------
def model_type(model: nn.Module) -> str | None:
    """``config.model_type`` of a transformers model (``"llama"``, ``"t5"``...), else None."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection(s), which "all-linear" leaves alone."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return {name for name, _ in named_base_modules(model) if name.rsplit(".", 1)[-1] in ("lm_head", "score", "classifier")}
    if isinstance(head, AdapterHost):
        head = head.base_layer
    return {name for name, module in named_base_modules(model) if module is head}


def check_regex(pattern: str, where: str) -> str:
    """``pattern`` if it compiles; else a ValueError saying where it came from, at config construction
    rather than as a ``re.error`` when the model is searched."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{where}: {pattern!r} is not a valid regular expression ({e}). A string is matched as a "
                         "regex against whole module names; to list names, give a list.") from None
    return pattern


def name_matches(name: str, pattern: str | list[str] | set[str] | tuple[str, ...]) -> bool:
    """``peft``'s matching rule: a string is a regex that must match the whole name; a list matches a
    name that equals an entry or ends with ``.`` + entry."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def find_targets(
    model: nn.Module,
    target_modules: str | list[str] | set[str] | tuple[str, ...],
    exclude_modules: str | list[str] | set[str] | tuple[str, ...] | None,
    supported: tuple[type[nn.Module], ...],
    method: str,
) -> list[str]:
    """Paths of the modules an adapter attaches to. Raises with the available names when nothing matches."""
    modules = list(named_base_modules(model))
    if target_modules == "all-linear":
        heads = output_head_names(model)
        found = [n for n, m in modules if isinstance(m, LINEAR_TYPES) and n not in heads]
    else:
        found = [n for n, _ in modules if name_matches(n, target_modules)]
    if exclude_modules:
        found = [n for n in found if not name_matches(n, exclude_modules)]
    if not found:
        raise ValueError(
            f"{method}: target_modules={target_modules!r} matches no module of {type(model).__name__}"
            f"{' after exclude_modules' if exclude_modules else ''}. Modules that can be targeted: "
            f"{describe_modules(model, supported)}"
        )
    by_name = dict(modules)
    wrong = [f"{n} ({type(by_name[n]).__name__})" for n in found if not isinstance(by_name[n], supported)]
    if wrong:
        kinds = ", ".join(t.__name__ for t in supported)
        raise ValueError(
            f"{method} supports {kinds} layers, but target_modules={target_modules!r} also matches "
            f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}. Narrow target_modules to layers of those types."
        )
    return found


def describe_modules(model: nn.Module, supported: tuple[type[nn.Module], ...], holding: bool = False, limit: int = 30) -> str:
    """A short list of targetable module names (distinct last components with their types), for error
    messages: modules of the ``supported`` types, or with ``holding`` every named block that contains one
    (bottleneck adapters target blocks, not layers)."""
    seen: dict[str, str] = {}
    for name, module in named_base_modules(model):
        last = name.rsplit(".", 1)[-1]
        if holding:
            if not last.isdigit() and any(isinstance(m, supported) for m in module.modules()):
                seen.setdefault(last, type(module).__name__)
        elif isinstance(module, supported):
            seen.setdefault(last, type(module).__name__)
    if not seen:
        return "(none of the supported types)"
    items = [f"{k} ({v})" for k, v in seen.items()]
    return ", ".join(items[:limit]) + (" ..." if len(items) > limit else "")


def module_names(value: Any, field_name: str, regex_ok: bool = True, allow_empty: bool = True) -> Any:
    """A config's module-name setting, checked: None, a regex string (if ``regex_ok``), or a list of names
    (a set becomes a sorted list). ``field_name`` names the setting in the error (``"LoraConfig: target_modules"``)."""
    if value is None or value == "all-linear":
        return value
    if regex_ok and isinstance(value, str):
        return check_regex(value, field_name)
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value) and (value or allow_empty):
        return sorted(set(value)) if isinstance(value, (set, frozenset)) else list(value)
    kinds = f"a{'' if allow_empty else ' non-empty'} list of module names{', a regex string' if regex_ok else ''} or None"
    raise ValueError(f"{field_name} must be {kinds}, got {value!r}.")


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or name == BASE or name in dir(nn.ModuleDict):
        raise ValueError(
            f"Adapter name {name!r} is not usable: use letters, digits, '_' or '-' (not {BASE!r} or a ModuleDict attribute)."
        )

