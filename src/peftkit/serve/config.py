"""ServeConfig: everything ``peftkit serve`` needs, as one flat dataclass the command line fills."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class ServeConfig:
    """Options of the OpenAI-compatible adapter server.

    Args:
        model: The base model: a local Hugging Face model directory (config, tokenizer, weights).
        adapters: ``{name: directory}`` of adapters to load at start; clients pick one with ``"model": name``.
        served_model_name: The name clients use for the bare base model (default: the model directory's name).
        host: Interface to listen on. The default, 127.0.0.1, keeps the server private to this machine;
            ``0.0.0.0`` exposes it to the network (set ``api_key`` then).
        port: TCP port; 0 picks a free one (printed at start).
        api_key: When set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        max_batch_size: Most requests decoded together in one forward pass. Larger batches raise
            throughput until the machine saturates, at the cost of per-token latency.
        max_queue: Most requests waiting for a batch slot; beyond it clients get 429 and should retry. One
            request asking for more completions (n x prompts) than this can never fit and gets 400.
        adapter_root: Directory under which ``POST /v1/load_lora_adapter`` may load adapters. Unset,
            loading at run time is refused (a client could otherwise read any path the server can).
        max_model_len: Longest prompt + completion, in tokens (default: the model's limit). Lower it to
            bound memory: the KV cache grows with it.
        device: ``cpu``, ``cuda``, ``cuda:1``... (default: cuda when available).
        dtype: Weights' dtype; ``auto`` is float32 on CPU and the checkpoint's dtype on a GPU.
        kv_cache: Where the running requests' keys and values live. ``static``: preallocated slots written in
            place (grown by doubling, kept between requests); ``dynamic``: transformers' cache, copied as it
            grows; ``auto``: static unless the model has sliding-window layers. The same tokens either way.
        prepack_weights: On a CPU, the base model's linear layers compute with copies of their weights
            prepacked once for oneDNN: faster decoding steps, for the linear layers' memory once more.
            Adapters stay separate per request.
    """

    model: str
    adapters: dict[str, str] = field(default_factory=dict)
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 32
    max_queue: int = 256
    adapter_root: str | None = None
    max_model_len: int | None = None
    device: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kv_cache: Literal["auto", "static", "dynamic"] = "auto"
    prepack_weights: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}.")
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1.")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}.")
        if self.kv_cache not in ("auto", "static", "dynamic"):
            raise ValueError(f"kv_cache must be auto, static or dynamic, got {self.kv_cache!r}.")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; leave it unset to serve without a key.")
        for name, path in self.adapters.items():
            if not (Path(path) / "adapter_config.json").is_file():
                raise FileNotFoundError(f"Adapter {name!r}: {path} has no adapter_config.json.")
        if self.adapter_root is not None and not Path(self.adapter_root).is_dir():
            raise FileNotFoundError(f"adapter_root {self.adapter_root} is not a directory.")

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model)
        return path.resolve().name if path.exists() else self.model
