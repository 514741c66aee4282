"""One file per method; importing this package registers them all."""

from . import adalora, bottleneck, dora, full, ia3, lora, p_tuning, prefix_tuning, prompt_tuning, selective  # noqa: F401
