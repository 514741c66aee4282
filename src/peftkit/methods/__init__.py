"""One file per method; importing this package registers them all."""

from . import lora, p_tuning, prefix_tuning, prompt_tuning  # noqa: F401
