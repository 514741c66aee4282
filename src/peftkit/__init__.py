"""peftkit: parameter-efficient fine-tuning of transformer models.

    from peftkit import LoraConfig, get_peft_model
    model = get_peft_model(base_model, LoraConfig(r=8, lora_alpha=16))
"""

from . import methods  # noqa: F401  (registers every method)
from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig, TaskType
from .functional import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from .methods.bottleneck import BottleneckConfig
from .methods.full import FullConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig
from .methods.p_tuning import PromptEncoderConfig
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.prompt_tuning import PromptTuningConfig
from .methods.selective import SelectiveConfig
from .model import PeftModel, get_peft_model
from .quantize import prepare_model_for_kbit_training

__version__ = "0.1.0"

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BottleneckConfig",
    "FullConfig",
    "IA3Config",
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
    "TaskType",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
]
