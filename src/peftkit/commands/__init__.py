"""Subcommands of the ``peftkit`` CLI, in the order ``--help`` lists them."""

from . import eval, info, merge, models, serve, train

COMMANDS = [train, eval, merge, serve, models, info]
