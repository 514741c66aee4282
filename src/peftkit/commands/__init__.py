"""Subcommands of the ``peftkit`` CLI, in the order ``--help`` lists them."""

from . import check, compare, eval, info, merge, merge_adapters, models, serve, sweep, train

COMMANDS = [train, eval, compare, sweep, merge, merge_adapters, check, serve, models, info]
