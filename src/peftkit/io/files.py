"""``adapter_config.json`` + ``adapter_model.safetensors``: atomic writes, safe and strict reads.

Only safetensors are read; a pickled ``adapter_model.bin`` is refused (loading a pickle can run code).
Every file is written to a temporary name in the same directory and renamed into place, so an
interrupted save leaves the previous file (or none), never half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path`` (same directory, same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses tensors that share memory or are non-contiguous views. Copy only those: a full
    # fine-tuning checkpoint is the whole model, and copying every tensor would double it while saving.
    plain: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.untyped_storage().data_ptr() in storages:
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        plain[key] = value
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=metadata or {"format": "pt"}))


def save_adapter_files(directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write one adapter: weights first, then the config that describes them."""
    directory = Path(directory)
    save_tensors(directory / WEIGHTS_NAME, tensors)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {str(directory)!r} does not exist.")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    return data


def load_adapter_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickles = [n for n in PICKLE_NAMES if (directory / n).exists()]
        hint = (
            f" Found {pickles[0]}, a pickle, which peftkit does not load because unpickling can run code; "
            "re-save it as safetensors with the tool that wrote it."
            if pickles
            else ""
        )
        raise FileNotFoundError(f"{path} is missing.{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}).") from None


def load_adapter_files(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return load_adapter_config(directory), load_adapter_tensors(directory)
