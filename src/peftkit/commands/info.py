"""``peftkit methods``: every name ``--method`` takes, what it does, its default learning rate and its options.

Options are the fields of the method's config class, named as in ``peft`` (``lora.r``); set them with
``--r 16``, ``--set lora.r=16`` or a ``lora:`` mapping in a YAML ``--config``.
"""

from __future__ import annotations

import argparse
import textwrap


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list every --method name: what it does, default learning rate, options",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..registry import presets

    known = presets()
    width = max(len(name) for name in known)
    print(f"{'METHOD':<{width}}  {'LR':>6}  WHAT IT DOES (config class; options with their defaults)")
    for name, preset in known.items():
        print(f"{name:<{width}}  {preset.default_lr:>6g}  {preset.help}")
        fixed = "".join(f", {k}={v!r} fixed" for k, v in preset.fixed.items())
        options = ", ".join(f"{k}={v!r}" for k, v in preset.option_defaults().items()) or "none"
        details = f"{preset.config_class.__name__} (peft_type {preset.config_class.peft_type}{fixed}); options: {options}"
        for line in textwrap.wrap(details, 110 - width - 10):
            print(f"{'':<{width + 10}}{line}")
    return 0
