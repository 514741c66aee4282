"""Helpers for parity tests against the reference ``peft`` package (a test-only dependency)."""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from conftest import build
from safetensors.torch import load_file

WEIGHTS = "adapter_model.safetensors"


def nudge(model: torch.nn.Module, seed: int = 5, scale: float = 0.3) -> None:
    """Move every trainable tensor away from its initial value, so a fresh (no-op) adapter shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def peft_model(arch: str, config) -> torch.nn.Module:
    """A ``peft`` model with ``config`` on a fresh tiny ``arch`` (seed 0, the same base peftkit tests use)."""
    return peft.get_peft_model(build(arch), config)


def load_in_peft(arch: str, directory: Path, is_trainable: bool = False) -> torch.nn.Module:
    return peft.PeftModel.from_pretrained(build(arch), str(directory), is_trainable=is_trainable).eval()


def saved_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(str(Path(directory) / WEIGHTS)).items()}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def merged_diff_vs_peft(model: torch.nn.Module, arch: str, directory: Path) -> float:
    """Save ``model``'s adapter to ``directory``, merge it in peftkit and in ``peft`` (loading the saved files),
    and return the largest difference between the two merged state dicts (their keys must agree)."""
    model.save_pretrained(directory)
    ours = model.merge_and_unload().state_dict()
    theirs = load_in_peft(arch, directory).merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    return max(max_abs_diff(ours[k], theirs[k]) for k in ours)
