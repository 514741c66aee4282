"""Subcommands of the ``peftkit`` CLI, in the order ``--help`` lists them."""

from . import compare, eval, info, merge, merge_adapters, models, serve, sweep, train

COMMANDS = [train, eval, compare, sweep, merge, merge_adapters, serve, models, info]
