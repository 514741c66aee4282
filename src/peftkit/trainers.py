"""``transformers.Trainer`` and TRL's ``SFTTrainer`` / ``DPOTrainer`` for peftkit models: one import instead of theirs.

    from peftkit.trainers import Trainer        # instead of: from transformers import Trainer
    from peftkit.trainers import SFTTrainer     # instead of: from trl import SFTTrainer
    from peftkit.trainers import DPOTrainer     # instead of: from trl import DPOTrainer

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
  wrapper, where TRL installs it for a ``peft`` model;
- ``DPOTrainer``'s reference is the policy with its adapter disabled (or a frozen ``"ref"`` copy of an adapter the
  model came with), as TRL does for a ``peft`` model, instead of a second model TRL would load by name.

Models that are not peftkit models go through the trainers' own code unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .config import PeftConfig
from .io.files import CONFIG_NAME, WEIGHTS_NAME, load_adapter_tensors
from .inject import AdapterHost
from .model import PeftModel, get_peft_model

__all__ = ["AdapterTrainerMixin", "DPOTrainer", "SFTTrainer", "Trainer"]


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


def _wrap_for_trl(trainer: str, model: Any, peft_config: Any) -> tuple[Any, Any, bool]:
    """``(model, peft_config, created)`` for a TRL trainer: a peftkit ``peft_config`` wraps ``model`` here with
    ``get_peft_model`` (TRL would refuse it, as it is not a ``peft.PeftConfig``) and is then passed on as None."""
    if not isinstance(peft_config, PeftConfig):
        return model, peft_config, False
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(f"With a peftkit peft_config, pass the model itself, e.g. {trainer}(model="
                        "AutoModelForCausalLM.from_pretrained(name), peft_config=config, ...).")
    return get_peft_model(model, peft_config), None, True


def _sft_trainer() -> type:
    from trl import SFTTrainer as TRLSFTTrainer
    from trl.trainer.utils import add_fused_lm_head

    class SFTTrainer(AdapterTrainerMixin, TRLSFTTrainer):
        """TRL's ``SFTTrainer`` for peftkit models: ``model`` may be a peftkit model, or ``peft_config`` a
        peftkit config (then ``model`` must be a model object; it is wrapped with ``get_peft_model``)."""

        def __init__(self, model: Any, *args: Any, peft_config: Any = None, **kwargs: Any) -> None:
            model, peft_config, _ = _wrap_for_trl("SFTTrainer", model, peft_config)
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


class AdapterOffReference(torch.nn.Module):
    """DPO's reference model for a peftkit policy: the policy itself with its adapters disabled (or with the frozen
    ``"ref"`` copy of a pretrained adapter active), as TRL computes the reference for a ``peft`` model. It holds no
    weights of its own; the policy is reached through the trainer, so the model the trainer runs (wrapped by
    accelerate or not) is the one called."""

    def __init__(self, trainer_model: Any) -> None:
        super().__init__()
        self._trainer_model = trainer_model  # a callable returning the trainer's current model (not a submodule)

    @property
    def config(self) -> Any:
        return self._policy().config

    def _policy(self) -> PeftModel:
        model = self._trainer_model()
        while not isinstance(model, PeftModel) and hasattr(model, "module"):  # DDP / DataParallel wrappers
            model = model.module
        return model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        policy = self._policy()
        if "ref" in policy.peft_config:
            previous = policy.active_adapter
            policy.set_adapter("ref")
            try:
                return self._trainer_model()(*args, **kwargs)
            finally:
                policy.set_adapter(previous)
        with policy.disable_adapter():
            return self._trainer_model()(*args, **kwargs)


def _dpo_trainer() -> type:
    from trl import DPOTrainer as TRLDPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    class DPOTrainer(AdapterTrainerMixin, TRLDPOTrainer):
        """TRL's ``DPOTrainer`` for peftkit models: ``model`` may be a peftkit model, or ``peft_config`` a peftkit
        config (then ``model`` must be a model object). Without a ``ref_model`` the reference is what TRL uses for a
        ``peft`` model: the base model with the adapter disabled, or, when ``model`` arrives with a (pretrained)
        adapter, a frozen copy of it named ``"ref"``."""

        def __init__(self, model: Any, ref_model: Any = None, *args: Any, peft_config: Any = None, **kwargs: Any) -> None:
            model, peft_config, created = _wrap_for_trl("DPOTrainer", model, peft_config)
            reference = None
            if isinstance(model, PeftModel):
                if isinstance(model.get_output_embeddings(), AdapterHost):
                    if created:
                        model.unload()  # leave the caller's model as it came
                    raise ValueError("DPOTrainer computes log-probabilities from lm_head.weight directly, so an adapter "
                                     "on lm_head would never train; remove 'lm_head' from target_modules.")
                if ref_model is None and not created:
                    # TRL's rule for a peft model handed in with its adapter: the reference is a frozen copy of it.
                    model.add_adapter("ref", dataclasses.replace(model.peft_config["default"], inference_mode=True))
                    model._tuner("ref").load_state_dict(model._tuner("default").state_dict(), source="the default adapter")
                if ref_model is None:
                    # A stand-in TRL accepts as a reference model, so that it does not load a second copy of the base
                    # model by name: TRL lets only peft models act as their own reference.
                    reference = ref_model = AdapterOffReference(lambda: self.model)
            super().__init__(model, ref_model, *args, peft_config=peft_config, **kwargs)
            wrapper = self._peftkit_model()
            if wrapper is not None and "forward" in wrapper.__dict__:
                # As in SFTTrainer: TRL's fused LM head goes on the transformers model inside the wrapper.
                del wrapper.__dict__["forward"]
                add_fused_lm_head(wrapper.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1")
                                  + (("log_sum_sq_probs",) if self.use_weighting else ()))
            if reference is not None:
                # TRL installed its fused head (and accelerate perhaps autocast) on the stand-in's forward; the
                # stand-in calls the policy, which carries both already.
                reference.__dict__.pop("forward", None)
                self.ref_model = reference

    return DPOTrainer


def __getattr__(name: str) -> Any:
    # TRL is optional: imported only when SFTTrainer or DPOTrainer is asked for.
    makers = {"SFTTrainer": _sft_trainer, "DPOTrainer": _dpo_trainer}
    if name in makers:
        cls = makers[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
