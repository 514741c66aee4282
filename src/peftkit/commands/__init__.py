"""Subcommands of the ``peftkit`` CLI, in the order ``--help`` lists them."""

from . import eval, info, merge, models, train

COMMANDS = [train, eval, merge, models, info]
