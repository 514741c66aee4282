"""``transformers.Trainer`` and TRL's ``SFTTrainer`` for peftkit models: one import instead of theirs.

    from peftkit.trainers import Trainer        # instead of: from transformers import Trainer
    from peftkit.trainers import SFTTrainer     # instead of: from trl import SFTTrainer

Why subclasses: both trainers recognise an adapter model only by ``isinstance(model, peft.PeftModel)``, and
peftkit never imports ``peft``. Any other model is saved as a plain torch module (its whole state dict in
``model.safetensors``). Training itself needs nothing from here: a :class:`peftkit.PeftModel` exposes the
base model's ``forward`` signature (so the Trainer keeps the dataset's input columns), and gradient
checkpointing reaches the base model through attribute fall-through. What these subclasses add is what
the trainers do for a ``peft`` model:

- every checkpoint and ``save_model()`` write the adapters in the PEFT format (``adapter_config.json`` +
  ``adapter_model.safetensors``; ``peft`` and peftkit load them), not the whole model;
- ``resume_from_checkpoint`` and ``load_best_model_at_end`` load those adapter files back;
- ``label_smoothing_factor > 0`` scores a causal LM against next-token labels, as the Trainer does for a ``peft``
  model (it recognises causal LMs by class name and would score a peftkit model's logits unshifted);
- ``SFTTrainer(peft_config=peftkit.LoraConfig(...))`` wraps the model with peftkit, and TRL's fused LM head
  (per-token log-probabilities without the full logits) is installed on the transformers model inside the
  wrapper, where TRL installs it for a ``peft`` model.

Models that are not peftkit models go through the trainers' own code unchanged.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .config import PeftConfig
from .io.files import CONFIG_NAME, WEIGHTS_NAME, load_adapter_tensors
from .model import PeftModel, get_peft_model

__all__ = ["AdapterTrainerMixin", "SFTTrainer", "Trainer"]


class AdapterTrainerMixin:
    """Save, resume and reload peftkit adapters in a ``transformers.Trainer`` subclass (put it first in the bases)."""

    def _peftkit_model(self, model: Any = None) -> PeftModel | None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        return model if isinstance(model, PeftModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._peftkit_model()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        # What the Trainer writes beside every model it saves (written, never read, by transformers).
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        peft_model = self._peftkit_model(model)
        if peft_model is None or not _has_adapter_files(resume_from_checkpoint):
            # A checkpoint of the whole model (written by a plain Trainer) still loads the Trainer's way.
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapters(peft_model, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        peft_model = self._peftkit_model()
        best = self.state.best_model_checkpoint
        if peft_model is None or best is None or not _has_adapter_files(best):
            return super()._load_best_model()
        load_adapters(peft_model, best)
        return None


def load_adapters(model: PeftModel, directory: str | os.PathLike) -> None:
    """Load the weights saved by ``model.save_pretrained(directory)`` into the model's existing adapters
    (``default`` at the top of ``directory``, the others in sub-folders named after them)."""
    directory = Path(directory)
    for name in model.peft_config:
        where = directory if name == "default" else directory / name
        if not (where / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{where} holds no {WEIGHTS_NAME} for adapter {name!r}; was it saved from this model?")
        model._tuner(name).load_state_dict(load_adapter_tensors(where), source=str(where))


def _has_adapter_files(directory: str | os.PathLike) -> bool:
    return (Path(directory) / CONFIG_NAME).is_file() and (Path(directory) / WEIGHTS_NAME).is_file()


class Trainer(AdapterTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that saves and resumes peftkit models as adapters (PEFT format)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self._peftkit_model()
        if model is not None and self.label_smoother is not None and self.compute_loss_func is None:
            # With label_smoothing_factor > 0, Trainer.compute_loss shifts the labels (next-token targets) only for
            # a model whose class name is a causal LM's, and reads that name from the base model only for a peft
            # model: a peftkit model's logits would be scored against unshifted labels. Hand it the same
            # smoother through the Trainer's own compute_loss_func hook, shifted as for the base model.
            causal = model.get_base_model()._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
            self.compute_loss_func = functools.partial(self.label_smoother, shift_labels=causal)


def _sft_trainer() -> type:
    from trl import SFTTrainer as TRLSFTTrainer
    from trl.trainer.utils import add_fused_lm_head

    class SFTTrainer(AdapterTrainerMixin, TRLSFTTrainer):
        """TRL's ``SFTTrainer`` for peftkit models: ``model`` may be a peftkit model, or ``peft_config`` a
        peftkit config (then ``model`` must be a model object; it is wrapped with ``get_peft_model``)."""

        def __init__(self, model: Any, *args: Any, peft_config: Any = None, **kwargs: Any) -> None:
            if isinstance(peft_config, PeftConfig):
                if isinstance(model, (str, os.PathLike)):
                    raise TypeError(
                        "With a peftkit peft_config, pass the model itself, e.g. "
                        "SFTTrainer(model=AutoModelForCausalLM.from_pretrained(name), peft_config=config, ...)."
                    )
                model, peft_config = get_peft_model(model, peft_config), None
            super().__init__(model, *args, peft_config=peft_config, **kwargs)
            wrapper = self._peftkit_model()
            if wrapper is not None and "forward" in wrapper.__dict__:
                # TRL took the wrapper for a plain transformers model and replaced its forward with a fused LM
                # head that runs ``self.base_model`` as the backbone. Install the head where TRL installs it for
                # a peft model: on the transformers model; the wrapper's own forward (soft prompts, mixed
                # batches) then runs first and hands ``fused_lm_head=True`` on to it.
                del wrapper.__dict__["forward"]
                add_fused_lm_head(wrapper.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))

    return SFTTrainer


def __getattr__(name: str) -> Any:
    # TRL is optional: imported only when SFTTrainer is asked for.
    if name == "SFTTrainer":
        cls = _sft_trainer()
        globals()["SFTTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
