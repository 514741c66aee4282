r"""Combining LoRA adapters into a new one (``PeftModel.add_weighted_adapter``), as ``peft`` does.

Given adapters ``i = 1..n`` with weights ``w_i`` and updates ``dW_i = s_i B_i A_i``, the combination types are:

``cat``                ``A = [w_1 s_1 A_1; ...; w_n s_n A_n]``, ``B = [B_1 ... B_n]``: exactly ``sum w_i dW_i``, at rank
                       ``sum r_i``.
``svd``                ``sum w_i dW_i`` (or the pruned/elected variants ``*_svd`` below), truncated to rank ``svd_rank``
                       by SVD: ``B = U S``, ``A = V^T``. Exact up to the truncation.
``linear``             ``A = sum c_i A_i``, ``B = sum |c_i| B_i`` with ``c_i = sign(w_i s_i) sqrt(|w_i s_i|)``: cheap,
                       but the product has cross terms ``B_i A_j``, so it is only an approximation.
``ties``               TIES-Merging (Yadav et al., 2023, https://arxiv.org/abs/2306.01708): keep the ``density``
                       fraction of largest-magnitude entries of each tensor, elect a sign per entry (sign of the sum,
                       or of the count with ``majority_sign_method="frequency"``), average the entries that agree.
``dare_linear``        DARE (Yu et al., 2023, https://arxiv.org/abs/2311.03099): drop each entry with probability
                       ``1 - density``, rescale the rest by ``1/density``, then sum as ``linear``.
``dare_ties``          DARE's random drop, then TIES' sign election and disjoint mean.
``magnitude_prune``    keep the ``density`` fraction of largest entries of each tensor, then sum as ``linear``.

``linear``, ``ties``, ``dare_*`` and ``magnitude_prune`` combine the ``A`` and the ``B`` matrices separately (with
weights ``c_i`` and ``|c_i|``) and need equal ranks. The DARE masks are drawn from torch's global generator, in
the order ``peft`` draws them (module by module in model order, all ``A`` then all ``B``): after the same
``torch.manual_seed`` both libraries drop the same entries.

The new adapter's config is the first adapter's with ``r = lora_alpha =`` the new rank (scaling 1), the targets of
all the adapters, and no rank/alpha patterns. Modules the first adapter trains in full (``modules_to_save``) start
as fresh copies of the base module in the new adapter, as in ``peft``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Literal

import torch

from ..inject import hosts
from .base import ModuleCopy
from .lora import LoraConfig, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear

if TYPE_CHECKING:
    from ..model import PeftModel

__all__ = ["COMBINATION_TYPES", "CombinationType", "add_weighted_adapter", "combine"]

CombinationType = Literal[
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
    "magnitude_prune", "magnitude_prune_svd",
]
COMBINATION_TYPES: tuple[str, ...] = CombinationType.__args__  # type: ignore[attr-defined]
_PRUNING = ("ties", "dare_ties", "dare_linear", "magnitude_prune")


# --- the math on stacked task tensors --------------------------------------------------------------
def _prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"]) -> torch.Tensor:
    """Keep a ``density`` fraction of ``tensor``'s entries: the largest in magnitude, or a random draw
    (Bernoulli(density) per entry, survivors rescaled by ``1/density`` so the expectation is unchanged)."""
    if density >= 1:
        return tensor
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n, ...) * (n,) -> (n, ...): each task tensor times its weight."""
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def _disjoint_mean(stacked: torch.Tensor, weights: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    """TIES: per entry, the mean of the weighted entries whose sign agrees with the elected sign."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if majority_sign_method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(votes >= 0, 1, -1)
    return (_weighted(stacked, weights) * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def combine(
    kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """One combined tensor from ``n`` task tensors of one shape and their weights (n,).
    ``kind``: ``linear`` (weighted sum), ``ties``, ``dare_linear``, ``dare_ties`` or ``magnitude_prune``."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [_prune(t, density, "magnitude") for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_prune(t, density, "random") for t in tensors]
    elif kind != "linear":
        raise ValueError(f"Unknown combination {kind!r}; expected linear or one of {list(_PRUNING)}.")
    stacked = torch.stack(tensors, dim=0)
    if kind in ("ties", "dare_ties"):
        return _disjoint_mean(stacked, weights, majority_sign_method)
    return _weighted(stacked, weights).sum(dim=0)


# --- on a model -------------------------------------------------------------------------------------
def add_weighted_adapter(
    model: "PeftModel",
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: CombinationType = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> None:
    """Add ``adapter_name``: the LoRA adapters ``adapters`` combined with ``weights`` (see the module docstring).
    Arguments as in ``peft``'s ``LoraModel.add_weighted_adapter``. The new adapter starts inactive and frozen."""
    configs = _check(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
                     majority_sign_method)
    if len(adapters) == 1:  # one adapter: every type reduces to scaling it, which "linear" does exactly
        combination_type = "linear"
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type == "cat":
        rank = sum(ranks)
    elif combination_type.endswith("svd"):
        rank = svd_rank or max(ranks)
    elif len(set(ranks)) != 1:
        raise ValueError(f"combination_type={combination_type!r} needs adapters of one rank, got ranks {ranks}; "
                         "use 'cat' or 'svd' to combine adapters of different ranks.")
    else:
        rank = ranks[0]
    targets: list[str] = []
    for name in adapters:
        tuner = model._tuner(name)
        wanted = tuner.target_modules()
        names = wanted if isinstance(wanted, list) else [p for p, layer in tuner.layers() if isinstance(layer, LoraLayer)]
        targets += [t for t in names if t not in targets]
    config = dataclasses.replace(configs[0], r=rank, lora_alpha=rank, target_modules=targets, rank_pattern={},
                                 alpha_pattern={})
    try:
        model.add_adapter(adapter_name, config)  # refuses a rank larger than a target layer allows
    except ValueError as e:
        if combination_type == "cat" or combination_type.endswith("svd"):
            source = "svd_rank" if combination_type.endswith("svd") else "the sum of the ranks ('cat')"
            raise ValueError(f"{source} is {rank}: {e}") from None
        raise
    try:
        with torch.no_grad():
            for path, host in list(hosts(model._tuner(adapter_name).model)):
                new = host.adapters[adapter_name] if adapter_name in host.adapters else None
                if not isinstance(new, LoraLayer):
                    continue
                found = [(host.adapters[a], w) for a, w in zip(adapters, weights)
                         if a in host.adapters and isinstance(host.adapters[a], LoraLayer)]
                if not found:
                    raise ValueError(f"{path}: none of {adapters} adapts this module.")
                _fill(new, found, combination_type, rank, path, svd_clamp, svd_full_matrices, svd_driver, density,
                      majority_sign_method)
    except Exception:
        model.delete_adapter(adapter_name)
        raise


def _pair(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a LoRA layer: A (r, in...), B (out, r...)."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A, layer.lora_embedding_B
    return layer.lora_A.weight, layer.lora_B.weight


def _fill(new: LoraLayer, found: list[tuple[LoraLayer, float]], kind: str, rank: int, path: str, svd_clamp,
          full_matrices: bool, driver, density, majority_sign_method) -> None:
    new_a, new_b = _pair(new)
    new_a.zero_(), new_b.zero_()
    if kind == "cat":
        a = torch.cat([_pair(layer)[0] * w * layer.scaling for layer, w in found], dim=0)
        b = torch.cat([_pair(layer)[1] for layer, _ in found], dim=1)
        new_a[: a.shape[0]] = a
        new_b[:, : b.shape[1]] = b
        return
    if kind.endswith("svd"):
        a, b = _svd(new, found, kind.removesuffix("_svd").replace("svd", "linear"), rank, path, svd_clamp,
                    full_matrices, driver, density, majority_sign_method)
    else:
        # A and B are combined separately; the sign of w*s goes on A only, or it would cancel out in B A.
        c = [w * layer.scaling for layer, w in found]
        weights_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in c], device=new_a.device)
        weights_b = torch.tensor([math.sqrt(abs(x)) for x in c], device=new_a.device)
        a = combine(kind, [_pair(layer)[0] for layer, _ in found], weights_a, density, majority_sign_method)
        b = combine(kind, [_pair(layer)[1] for layer, _ in found], weights_b, density, majority_sign_method)
    new_a.copy_(a.to(new_a.dtype))
    new_b.copy_(b.to(new_b.dtype))


def _svd(new: LoraLayer, found, kind: str, rank: int, path: str, clamp, full_matrices, driver, density,
         majority_sign_method) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank ``rank`` from the SVD of the combined update ``sum w_i dW_i`` (pruned first for ``*_svd``)."""
    deltas = [layer.delta_weight() for layer, _ in found]  # in the base weight's layout, scaling included
    delta = combine(kind, deltas, torch.tensor([w for _, w in found]).to(deltas[0].device), density, majority_sign_method)
    conv = isinstance(new, LoraConv2d)
    if conv:  # (out, in, kh, kw) -> (out, in*kh*kw), as peft does (a 1x1 kernel is squeezed to (out, in))
        delta = delta.squeeze() if tuple(delta.shape[2:4]) == (1, 1) else delta.flatten(start_dim=1)
    if isinstance(new, LoraEmbedding) or (isinstance(new, LoraLinear) and new.fan_in_fan_out):
        delta = delta.T  # back to (out, in)
    if rank > min(delta.shape):
        raise ValueError(f"{path}: svd_rank={rank} exceeds the size of this layer's update {tuple(delta.shape)}; "
                         f"use svd_rank <= {min(delta.shape)}.")
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u, vh = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    new_a, new_b = _pair(new)
    return vh.reshape(new_a.shape), u.reshape(new_b.shape)


def _check(model, adapters, weights, adapter_name, kind, svd_rank, svd_clamp, density, majority_sign_method) -> list[LoraConfig]:
    if isinstance(adapters, str) or not adapters:
        raise ValueError("adapters must be a non-empty list of adapter names.")
    if len(weights) != len(adapters):
        raise ValueError(f"Got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter.")
    if adapter_name in model.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} exists already; pick another adapter_name.")
    if kind not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={kind!r} is not one of {list(COMBINATION_TYPES)}.")
    prunes = any(kind.startswith(p) for p in _PRUNING)
    if prunes and (density is None or not 0 <= density <= 1):
        raise ValueError(f"combination_type={kind!r} keeps a `density` fraction of each tensor: give 0 <= density <= 1, got {density!r}.")
    if not prunes and density is not None:
        raise ValueError(f"density is used by {list(_PRUNING)} (and their _svd forms), not by {kind!r}; leave it None.")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
    if not kind.endswith("svd") and (svd_rank is not None or svd_clamp is not None):
        raise ValueError(f"svd_rank and svd_clamp apply to the svd combination types, not to {kind!r}.")
    configs = []
    for name in adapters:
        config = model._tuner(name).config
        if not isinstance(config, LoraConfig):
            raise TypeError(f"Adapter {name!r} is a {type(config).__name__}; only LoRA adapters can be combined.")
        if config.use_dora:
            raise ValueError(f"Adapter {name!r} uses DoRA, whose magnitude vectors cannot be combined; combine plain LoRA adapters.")
        configs.append(config)
    shared = [path for path, host in hosts(model._tuner(adapters[0]).model)
              if sum(isinstance(host.adapters[a], ModuleCopy) for a in adapters if a in host.adapters) > 1]
    if shared:
        raise ValueError(f"Adapters {adapters} each train their own copy of {shared} (modules_to_save), which cannot "
                         "be combined; combine adapters that train such a module in at most one of them.")
    return configs
