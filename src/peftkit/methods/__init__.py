"""One file per method; importing this package registers them all."""

from . import bottleneck, lora  # noqa: F401
