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

from ._args import add_config_arguments, flags_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..serve.config import ServeConfig

    p = sub.add_parser(
        "serve",
        help="serve a base model and its adapters over an OpenAI-compatible HTTP API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # One flag per ServeConfig field, described by its docstring; only the adapters take a friendlier form.
    dests = add_config_arguments(p, ServeConfig, skip={"adapters"}, extra_help={"api_key": " Unset: $PEFTKIT_API_KEY."},
                                 metavars={"api_key": "KEY", "adapter_root": "DIR", "served_model_name": "NAME"})
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter to serve as model NAME (repeatable); DIR holds adapter_config.json + adapter_model.safetensors. "
                        "A bare DIR is served under its folder name")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's log level")
    p.set_defaults(func=run, _dests=dests)


def config_from(args: argparse.Namespace):
    """The :class:`ServeConfig` the command line describes (unset flags keep the config's defaults)."""
    from ..serve.config import ServeConfig

    flags = flags_from(args, args._dests)
    flags.setdefault("api_key", os.environ.get("PEFTKIT_API_KEY"))
    return ServeConfig(adapters=parse_adapters(args.adapter), **flags)


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
    return serve(config_from(args), log_level=args.log_level)
