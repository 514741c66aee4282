"""Reading and writing adapters in the Hugging Face PEFT format."""

from .files import load_adapter_files, save_adapter_files
from .keys import HF_PREFIX, from_hf_key, to_hf_key

__all__ = ["HF_PREFIX", "from_hf_key", "load_adapter_files", "save_adapter_files", "to_hf_key"]
