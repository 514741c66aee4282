"""``peftkit methods``: list the registered PEFT methods."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the registered PEFT methods", description=__doc__)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..registry import registered_peft_types

    for peft_type in registered_peft_types():
        print(peft_type)
    return 0
