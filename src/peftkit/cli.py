"""The ``peftkit`` command: parses arguments into configs and calls the library. Each subcommand
lives in ``peftkit/commands/<name>.py`` and exposes ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse
import sys

from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit",
        description="Parameter-efficient fine-tuning: train, evaluate, compare, merge and serve adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .io.files import DiskFull

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, TypeError, DiskFull) as e:
        # Configuration and data mistakes: one clear line, not a traceback.
        print(f"peftkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
