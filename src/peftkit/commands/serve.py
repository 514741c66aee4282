"""``peftkit serve``: an OpenAI-compatible server for a base model and many adapters.

Clients pick an adapter with the request's ``model`` field (the base model's name means no adapter).
Concurrent requests for different adapters share one forward pass per decoding step.

Example:
    peftkit serve --model models/smollm2-135m-instruct --adapter summarize=out/summarize \\
        --adapter qa=out/qa --api-key secret
    curl http://127.0.0.1:8000/v1/completions -H 'Authorization: Bearer secret' \\
        -H 'Content-Type: application/json' -d '{"model": "summarize", "prompt": "...", "max_tokens": 64}'
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a base model and its adapters over an OpenAI-compatible HTTP API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="base model: a local Hugging Face model directory (config, tokenizer, weights)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter to serve as model NAME (repeatable); DIR holds adapter_config.json + adapter_model.safetensors. "
                        "A bare DIR is served under its folder name")
    p.add_argument("--served-model-name", metavar="NAME", help="the name clients use for the bare base model (default: the model folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s, this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 0 for any free one (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("PEFTKIT_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $PEFTKIT_API_KEY, else no key)")
    p.add_argument("--max-batch-size", type=int, default=32, metavar="N",
                   help="most requests decoded together in one forward pass (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="most requests waiting for a slot; more get HTTP 429 (default: %(default)s)")
    p.add_argument("--adapter-root", metavar="DIR",
                   help="allow POST /v1/load_lora_adapter for adapters under DIR (default: loading at run time is off)")
    p.add_argument("--max-model-len", type=int, metavar="N", help="longest prompt + completion in tokens (default: the model's limit)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype; auto = float32 on CPU, the checkpoint's dtype on GPU (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's log level")
    p.set_defaults(func=run)


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``["a=dir1", "dir2"]`` -> ``{"a": "dir1", "dir2's name": "dir2"}``; a name given twice is an error."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        if not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR.")
        if name in adapters:
            raise ValueError(f"--adapter: the name {name!r} is given twice.")
        adapters[name] = path
    return adapters


def run(args: argparse.Namespace) -> int:
    try:
        from ..serve.app import serve
    except ImportError as e:
        raise ValueError(f"peftkit serve needs the 'serve' extra ({e.name} is missing): pip install 'peftkit[serve]'") from None
    from ..serve.config import ServeConfig

    config = ServeConfig(
        model=args.model,
        adapters=parse_adapters(args.adapter),
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        adapter_root=args.adapter_root,
        max_model_len=args.max_model_len,
        device=args.device,
        dtype=args.dtype,
    )
    return serve(config, log_level=args.log_level)
