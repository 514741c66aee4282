"""One file per method; importing this package registers them all."""

from . import bottleneck, dora, full, ia3, lora, selective  # noqa: F401
