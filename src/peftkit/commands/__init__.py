"""Subcommands of the ``peftkit`` CLI, in the order ``--help`` lists them."""

from . import compare, eval, info, merge, models, serve, sweep, train

COMMANDS = [train, eval, compare, sweep, merge, serve, models, info]
