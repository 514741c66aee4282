"""Subcommands of the ``peftkit`` CLI, in the order ``--help`` lists them."""

from . import check, compare, eval, info, merge, models, serve, sweep, train

COMMANDS = [train, eval, compare, sweep, merge, check, serve, models, info]
