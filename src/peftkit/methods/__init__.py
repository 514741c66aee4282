"""One file per method; importing this package registers them all."""

from . import dora, full, ia3, lora, selective  # noqa: F401
