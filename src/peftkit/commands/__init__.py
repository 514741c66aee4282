"""Subcommands of the ``peftkit`` CLI, in the order ``--help`` lists them."""

from . import info, serve

COMMANDS = [info, serve]
