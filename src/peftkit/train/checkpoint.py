"""Checkpoints: all a run needs to continue exactly where it stopped, as safetensors + JSON (no pickle).

``OUTPUT/checkpoints/step-00000100/`` holds

    trainable.safetensors        the parameters being trained (adapter, or the whole model for `full`)
    optimizer.safetensors/.json  AdamW's moments and step counts / its param groups
    scheduler.json               the learning-rate schedule's position
    rng-<rank>.safetensors/.json random-number generators of every process (dropout, ...)
    state.json                   step, data position, resolved config (written last)

A sharded run (``--sharding fsdp``) writes ``trainable-<rank>`` and ``optimizer-<rank>`` instead: each
process its own piece, so no process ever holds the whole optimizer state; it resumes with as many processes.

A checkpoint is written into ``checkpoints/.tmp-step-...`` and renamed into place when complete, so a
run killed at any moment leaves only whole checkpoints behind; older ones are deleted afterwards.

The run's result (:func:`save_final`: the adapter or the whole model, the tokenizer, ``run.json``) is
staged beside ``OUTPUT`` and moved in with ``run.json`` last: ``run.json`` exists only next to a complete
result.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..io.files import atomic_write_text, remove_stale, save_tensors, staged_directory, tensor_bytes
from .sharding import local_shards, restore_shards

CHECKPOINTS = "checkpoints"
# The files whose presence says the run folder's result is complete: moved in last, run.json very last.
FINAL_MARKERS = ("config.json", "adapter_config.json", "run.json")


def checkpoint_path(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step:08d}"


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint in ``output`` (complete = renamed into place, state.json present)."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    output: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict[str, Any], accelerator, keep: int,
    sharded: bool = False,
) -> Path:
    """Write checkpoint ``step`` (every process calls this; rank 0 writes all but its own RNG state and,
    when ``sharded``, its own piece of the trained tensors and optimizer state)."""
    final = checkpoint_path(output, step)
    tmp = final.parent / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        tensors, info = _rng_state()
        save_tensors(tmp / f"rng-{accelerator.process_index}.safetensors", tensors)
        atomic_write_text(tmp / f"rng-{accelerator.process_index}.json", json.dumps(info))
        if sharded:
            _save_trained(tmp, f"-{accelerator.process_index}", model, optimizer)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if not sharded:
                _save_trained(tmp, "", model, optimizer)
            atomic_write_text(tmp / "scheduler.json", json.dumps(scheduler.state_dict()))
            atomic_write_text(tmp / "state.json", json.dumps(state, indent=2) + "\n")
    except Exception:
        # A failed write (a full disk) leaves no partial checkpoint; a kill leaves .tmp-step-*, which
        # nothing reads and the next run removes (remove_stale_checkpoints).
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        older = sorted(p for p in final.parent.glob("step-*") if p.name < final.name)
        for old in older[: max(0, len(older) - (keep - 1))]:  # keep the newest `keep`, this one included
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _save_trained(folder: Path, suffix: str, model: nn.Module, optimizer) -> None:
    """The trained tensors and their optimizer state (of a sharded model: this process's pieces)."""
    save_tensors(folder / f"trainable{suffix}.safetensors", local_shards(trainable_parameters(model)))
    opt_tensors, opt_info = _flatten_optimizer(optimizer.state_dict())
    save_tensors(folder / f"optimizer{suffix}.safetensors", local_shards(opt_tensors))
    atomic_write_text(folder / f"optimizer{suffix}.json", json.dumps(opt_info))


def remove_stale_checkpoints(output: Path) -> None:
    """Before a run writes to ``output``: remove what killed runs left behind there (temporary files,
    unfinished checkpoints, staging folders), and finish a final save that was interrupted while moving in."""
    remove_stale(output.parent)
    remove_stale(output)
    for tmp in (output / CHECKPOINTS).glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    remove_stale(output / CHECKPOINTS)


def save_final(
    output: Path, model: nn.Module, tokenizer, run: dict[str, Any], full_model: bool, extra: Callable[[Path], Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """The run's result into ``output``: the adapter (or, with ``full_model``, the trained model itself),
    the tokenizer, what ``extra(folder)`` writes, and ``run.json``, staged and moved in with ``run.json``
    last (see ``staged_directory``). ``tensors``: what to write instead of the model's own tensors (a
    sharded run's, gathered whole: the adapter's file keys, or the full model's state dict)."""
    # Full fine-tuning: merging keeps what training changed (its weights are the base weights; it refuses
    # a plain unload, which would have to restore the originals).
    result = model.merge_and_unload() if full_model else model
    size = tensor_bytes(p for p in result.parameters() if full_model or p.requires_grad)
    with staged_directory(output, last=FINAL_MARKERS, size=size) as staging:
        if full_model:
            result.save_pretrained(staging, state_dict=tensors)  # transformers' save: a whole state dict
        else:
            result.save_pretrained(staging, adapter_tensors=tensors)
        tokenizer.save_pretrained(staging)
        if extra is not None:
            extra(staging)
        atomic_write_text(staging / "run.json", json.dumps(run, indent=2) + "\n")


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``: step, data position, world size, the run's config."""
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, rank: int, sharded: bool = False) -> dict[str, Any]:
    """Restore a checkpoint into ``model``/``optimizer``/``scheduler`` and the RNGs; returns its state.json.
    ``sharded``: each process reads its own pieces (written by a sharded run with as many processes)."""
    state = read_state(path)
    suffix = f"-{rank}" if sharded else ""
    if not (path / f"trainable{suffix}.safetensors").is_file():
        raise ValueError(f"{path} has no trainable{suffix}.safetensors: it was written by a run "
                         f"{'without' if sharded else 'with'} --sharding fsdp; resume with the original settings.")
    saved = load_file(str(path / f"trainable{suffix}.safetensors"))
    with torch.no_grad():  # a sharded parameter's piece is its storage: copying into it below updates it
        params = local_shards(trainable_parameters(model))
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"{path} does not match this model's trainable parameters (missing {missing[:3]}, unexpected {extra[:3]}); "
            "was it written by a run with another model or method?"
        )
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(saved[name].shape)}, the model has {tuple(p.shape)}.")
            p.copy_(saved[name])
    info = json.loads((path / f"optimizer{suffix}.json").read_text(encoding="utf-8"))
    optimizer_state = _unflatten_optimizer(load_file(str(path / f"optimizer{suffix}.safetensors")), info)
    ordered = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict()'s numbering
    for index, entries in optimizer_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                entries[key] = restore_shards(ordered[index], value)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text(encoding="utf-8")))
    rng_file = path / f"rng-{rank}.safetensors"
    if not rng_file.is_file():
        raise ValueError(f"{path} has no random-number state for process {rank}; resume with the same number of processes.")
    _set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng-{rank}.json").read_text(encoding="utf-8")))
    return state


# --- optimizer state <-> tensors + JSON --------------------------------------------------------------
def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for index, entries in sd["state"].items():
        info["state"][str(index)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                info["state"][str(index)][key] = value
    return tensors, info


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in info["state"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": info["param_groups"]}


# --- random-number generators ----------------------------------------------------------------------
def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, py_gauss = random.getstate()
    info = {"python": [version, list(py_state), py_gauss], "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}
    return tensors, info


def _set_rng_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = info["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = info["python"]
    random.setstate((version, tuple(py_state), py_gauss))
