"""PeftModel: a base model with named adapters. Names follow the ``peft`` package.

The wrapper owns three things: the adapters by name (each a :class:`~peftkit.tuner.Tuner`), the
routing that decides which one runs, and the Hugging Face PEFT file format on disk. Everything
method-specific lives in the method's own file.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import PeftConfig
from .inject import check_adapter_name, freeze
from .hub import recorded_name
from .io.files import check_adapter_values, load_adapter_config, load_adapter_tensors, save_adapter_files
from .io.vllm import VllmCompatibilityWarning, vllm_problems
from .registry import config_from_dict, tuner_for
from .tuner import BASE, Routing, Tuner


def infer_task_type(model: nn.Module) -> str | None:
    """``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``, ... from a transformers model's class; None for other modules."""
    name = type(model).__name__
    if getattr(model, "config", None) is None:
        return None
    for suffix, task in (
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
        ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


class TunerModel(nn.Module):
    """``PeftModel.base_model``: a thin layer that holds the transformers model as ``.model``.

    This is ``peft``'s layering (there ``base_model`` is the ``LoraModel``, ``IA3Model``, ...): code written
    for ``peft`` reaches the transformers model as ``peft_model.base_model.model``, and every parameter of a
    PeftModel is named ``base_model.model.<module path>...``, the prefix of the PEFT file format. Calling it
    runs the model with the adapters in its layers; attributes it does not have come from the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class _ForwardWithBaseSignature:
    """``PeftModel.forward``, which reports the base model's signature when read from an instance.

    Code that picks a model's inputs from ``inspect.signature(model.forward)`` then sees the real input names:
    ``transformers.Trainer`` drops every dataset column the signature does not name (for a ``peft`` model it
    reads the base model's signature). Read from the class it is the plain function, whose ``labels``
    parameter is how transformers finds the label columns. A non-data descriptor, so code that replaces
    ``model.forward`` on an instance (accelerate's autocast, TRL) still can.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, instance: "PeftModel | None", owner: type | None = None) -> Any:
        if instance is None:
            return self.fn
        bound = functools.partial(self.fn, instance)
        bound.__signature__ = instance._forward_signature()  # type: ignore[attr-defined]
        return bound


class PeftModel(nn.Module):
    """A model whose base weights are frozen and whose named adapters can be trained, switched,
    merged, saved and loaded.

    Args:
        model: Any ``torch.nn.Module``; ``transformers`` models get per-architecture defaults.
        peft_config: The first adapter's config (``LoraConfig``, ``IA3Config``, ...); ``None``: the frozen
            model with no adapter yet, for ``load_adapter`` / ``add_adapter`` to fill (a server starts so).
        adapter_name: Its name; ``"default"`` is saved at the top of the directory, others in sub-folders.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise TypeError("The model is already a PeftModel; use add_adapter() to give it another adapter.")
        self.base_model = TunerModel(model)
        self.routing = Routing()
        self.peft_config: dict[str, PeftConfig] = {}
        self._tuners: dict[str, Tuner] = {}
        self._merged: str | None = None
        self._trainable_adapter: str | None = None  # the adapter whose parameters require grad
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        from .quantize import keep_training_layout  # a no-op without bitsandbytes layers

        keep_training_layout(model)  # a 4-bit base must stay trainable after an evaluation pass
        with _unchanged_on_error(model):  # e.g. no target module matched: the model stays trainable as it was
            freeze(model)
            if peft_config is not None:
                self.add_adapter(adapter_name, peft_config)
                self.set_adapter(adapter_name)

    # --- attribute access falls through to the base model (``model.config``, ``model.device``) ---
    # (``base_model`` is the TunerModel layer, ``get_base_model()`` the transformers model, as in ``peft``.)
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_tuners", "routing"):
                raise
            return getattr(self.base_model, name)

    # --- adapters by name -------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str:
        return self.routing.active

    @property
    def active_adapters(self) -> list[str]:
        return [self.routing.active]

    def tuner(self, adapter_name: str | None = None) -> Tuner:
        """The :class:`~peftkit.tuner.Tuner` of ``adapter_name`` (default: the active adapter)."""
        return self._tuners[adapter_name or self.active_adapter]

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Attach another adapter. It starts frozen and inactive: ``set_adapter`` selects it for training."""
        check_adapter_name(adapter_name)
        if adapter_name in self._tuners:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; delete_adapter() it or pick another name.")
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a peftkit config (LoraConfig, IA3Config, ...), got {type(peft_config).__name__}.")
        tuner_class = tuner_for(peft_config)
        if self._tuners and (tuner_class.is_exclusive(peft_config) or any(t.is_exclusive(t.config) for t in self._tuners.values())):
            raise ValueError(
                f"{type(peft_config).__name__} cannot share a model with adapter(s) {list(self._tuners)}: methods that "
                "train the base weights themselves (selective, full) need a model of their own."
            )
        if self._merged is not None:
            raise RuntimeError(f"Adapter {self._merged!r} is merged; unmerge_adapter() before adding another adapter.")
        with _unchanged_on_error(self):  # a tuner that fails builds nothing into the model (its own promise)
            tuner = tuner_class(self, adapter_name, peft_config)
        self._tuners[adapter_name] = tuner
        self.peft_config[adapter_name] = peft_config
        for _, p in tuner.named_parameters():
            p.requires_grad_(False)
        # New adapter modules start in training mode (torch's default); follow the base model's mode so
        # that, e.g., an adapter loaded onto a model in eval mode has its dropout off.
        self.train(self.get_base_model().training)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the adapter that runs (and trains, unless loaded for inference)."""
        self._tuner(adapter_name)
        if self._merged is not None and self._merged != adapter_name:
            raise RuntimeError(f"Adapter {self._merged!r} is merged into the weights; unmerge_adapter() before switching.")
        # Only the active adapter trains. Flip requires_grad only when that changes, so switching between
        # adapters loaded for inference is a single attribute write (microseconds).
        trainable = None if self.peft_config[adapter_name].inference_mode else adapter_name
        if trainable != self._trainable_adapter:
            if self._trainable_adapter in self._tuners:
                for _, p in self._tuners[self._trainable_adapter].named_parameters():
                    p.requires_grad_(False)
            if trainable is not None:
                for _, p in self._tuners[trainable].named_parameters():
                    p.requires_grad_(True)
            self._trainable_adapter = trainable
        self.routing.active = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        tuner = self._tuner(adapter_name)
        if self._merged == adapter_name:
            raise RuntimeError(f"Adapter {adapter_name!r} is merged; unmerge_adapter() before deleting it.")
        tuner.remove()
        del self._tuners[adapter_name], self.peft_config[adapter_name]
        if self._trainable_adapter == adapter_name:
            self._trainable_adapter = None
        if self.routing.active == adapter_name:
            self.routing.active = next(iter(self._tuners), None)
            if self.routing.active is not None:
                self.set_adapter(self.routing.active)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the bare base model inside the ``with`` block."""
        if self._merged is not None:
            raise RuntimeError(f"Adapter {self._merged!r} is merged into the weights; unmerge_adapter() first.")
        with contextlib.ExitStack() as stack:
            for tuner in self._tuners.values():  # methods that write into base weights restore them here
                stack.enter_context(tuner.disabled())
            previous = self.routing.enabled
            self.routing.enabled = False
            try:
                yield
            finally:
                self.routing.enabled = previous

    def _tuner(self, adapter_name: str) -> Tuner:
        try:
            return self._tuners[adapter_name]
        except KeyError:
            raise KeyError(f"No adapter named {adapter_name!r}; this model has {list(self._tuners)}.") from None

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **options: Any) -> None:
        """Add ``adapter_name``: LoRA ``adapters`` combined with ``weights`` (``combination_type`` ``"svd"``,
        ``"linear"``, ``"cat"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``, ...),
        as in ``peft``. See :func:`peftkit.methods.lora_combine.add_weighted_adapter` for the options and math."""
        from .methods.lora_combine import add_weighted_adapter  # the methods import this module

        add_weighted_adapter(self, adapters, weights, adapter_name, **options)

    # --- merging ----------------------------------------------------------------------------------
    def merge_adapter(self) -> None:
        """Fold the active adapter into the base weights (no added latency). Calling it twice is a no-op."""
        if self._merged is not None:
            return
        name = self.routing.active
        self._tuner(name).merge()
        self._merged = name

    def unmerge_adapter(self) -> None:
        """Undo ``merge_adapter`` (to float precision). A no-op when nothing is merged."""
        if self._merged is None:
            return
        self._tuners[self._merged].unmerge()
        self._merged = None

    def merge_and_unload(self, requantize: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Merge the active adapter and return the plain base model (original class and size).

        On a quantized base (bitsandbytes 4/8-bit, :mod:`peftkit.quantize`) every quantized layer is first
        dequantized to an ``nn.Linear`` and the adapter merged there in fp32, so the update is not rounded to
        4/8 bits. The model comes back unquantized in ``dtype`` (fp32 or bf16; transformers then saves it as an
        ordinary model), or with ``requantize=True`` quantized again as it was loaded (the base's size; the
        merged weights then carry quantization error). ``dtype`` and ``requantize`` apply to quantized bases only.
        """
        from .quantize import dequantize_model, forget_quantization, quantized_kind, requantize_model

        base = self.get_base_model()
        quantized = quantized_kind(base) is not None and self._merged is None
        if quantized:
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"merge_and_unload: dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}.")
            dequantize_model(base, torch.float32)
        self.merge_adapter()
        model = self._unload_all()
        if quantized:
            if requantize:
                requantize_model(model)
            else:
                forget_quantization(model)
                model.to(dtype)
        return model

    def unload(self) -> nn.Module:
        """Remove every adapter and return the base model exactly as it was (nothing merged)."""
        if self._merged is not None:
            raise RuntimeError(
                f"Adapter {self._merged!r} is merged; unmerge_adapter() first, or use merge_and_unload() to keep it."
            )
        return self._unload_all()

    def _unload_all(self) -> nn.Module:
        for tuner in self._tuners.values():
            tuner.remove()
        self._tuners.clear()
        self.peft_config.clear()
        self.routing.active, self._merged, self._trainable_adapter = None, None, None
        for n, p in self.get_base_model().named_parameters():
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        return self.get_base_model()

    def get_base_model(self) -> nn.Module:
        """The model the adapters are attached to (the transformers model); ``base_model.model`` in ``peft``."""
        return self.base_model.model

    # --- running ----------------------------------------------------------------------------------
    @_ForwardWithBaseSignature
    def forward(self, *args: Any, labels: Any = None, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Run the base model with the active adapter, or with ``adapter_names[i]`` for row ``i``
        (``"__base__"`` for no adapter). Takes the base model's inputs (``labels`` included)."""
        if labels is not None:
            kwargs["labels"] = labels
        with self._rows(adapter_names):
            args, kwargs = self._prepare_inputs(self.get_base_model().forward, args, kwargs, for_generate=False)
            if _is_position_mask(kwargs.get("logits_to_keep")):
                kwargs["logits_to_keep"] = _mask_virtual_tokens(kwargs["logits_to_keep"], kwargs)
            return self.base_model(*args, **kwargs)

    def _forward_signature(self) -> inspect.Signature:
        """The base model's ``forward`` signature plus ``adapter_names`` (cached per base ``forward``)."""
        base_forward = self.get_base_model().forward
        key = getattr(base_forward, "__func__", base_forward)
        cached = self.__dict__.get("_signature_cache")
        if cached is None or cached[0] is not key:
            params = list(inspect.signature(base_forward).parameters.values())
            if all(p.name != "adapter_names" for p in params):
                extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
                tail = [p for p in params if p.kind == p.VAR_KEYWORD]
                params = [p for p in params if p.kind != p.VAR_KEYWORD] + [extra] + tail
            cached = (key, inspect.Signature(params))
            self.__dict__["_signature_cache"] = cached
        return cached[1]

    def generate(self, *args: Any, adapter_names: list[str] | None = None, fold_adapter: bool = True, **kwargs: Any) -> Any:
        """The base model's ``generate`` with the active adapter, or ``adapter_names[i]`` for row ``i``.

        ``fold_adapter``: with one adapter for all rows, let it precompute what stays fixed during the call
        (LoRA computes ``W + s B A`` once: the speed of a merged model, for one temporary copy of each adapted
        weight, freed on return). ``False`` saves that memory and runs the adapter unmerged.

        Returns what the base model's ``generate`` returns for these inputs, adapter or not: for a causal LM
        the prompt's ids followed by the new tokens (B, L + T_new), for an encoder-decoder model the decoder's
        tokens only.
        """
        with self._rows(adapter_names), self._generation(fold_adapter and adapter_names is None):
            named = _keyword_inputs(self.get_base_model().generate, args, kwargs)[1]
            ids = named.get("input_ids") if named.get("input_ids") is not None else named.get("inputs")
            args, prepared = self._prepare_inputs(self.get_base_model().generate, args, kwargs, for_generate=True)
            embeds_only = prepared.get("inputs_embeds") is not None and all(prepared.get(k) is None for k in ("input_ids", "inputs"))
            if ids is not None and embeds_only and not self.get_base_model().config.is_encoder_decoder:
                # An adapter that hands generate embeddings only (a soft prompt) would make it return the new
                # tokens alone; with the ids beside the embeddings it returns the prompt too, as without one.
                prepared["input_ids"] = ids
            return self.get_base_model().generate(*args, **prepared)

    def _generation(self, fold: bool) -> contextlib.AbstractContextManager[None]:
        name = self.routing.active
        if not fold or not self.routing.enabled or name is None or self._merged is not None:
            return contextlib.nullcontext()
        return self._tuners[name].generation()

    def _prepare_inputs(
        self, fn: Any, args: tuple, kwargs: dict[str, Any], for_generate: bool
    ) -> tuple[tuple, dict[str, Any]]:
        """Let the active adapter change the inputs (soft prompts add virtual tokens). It sees every input
        by name: positional arguments are bound to ``fn``'s parameter names first."""
        if not self.routing.enabled or self.routing.rows is not None or self.routing.active is None:
            return args, kwargs
        args, kwargs = _keyword_inputs(fn, args, kwargs)
        if for_generate and kwargs.get("inputs") is not None:
            # generate's first parameter is the model's main input, whatever its name; name it as forward does.
            main = getattr(self.get_base_model(), "main_input_name", "input_ids")
            if kwargs.get(main) is not None:
                raise ValueError(f"generate() got both `inputs` and `{main}`; pass one.")
            kwargs[main] = kwargs.pop("inputs")
        return args, self._tuners[self.routing.active].prepare_inputs(kwargs, for_generate=for_generate)

    @contextlib.contextmanager
    def _rows(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError("adapter_names must be a list with one adapter name (or '__base__') per input row.")
        if not self.routing.enabled:
            raise RuntimeError("adapter_names cannot be used inside disable_adapter().")
        if self._merged is not None:
            raise RuntimeError(f"Adapter {self._merged!r} is merged; unmerge_adapter() before running a mixed batch.")
        self.check_mixed_batch(adapter_names)
        self.routing.set_rows(list(adapter_names))
        try:
            yield
        finally:
            self.routing.set_rows(None)

    # --- parameter accounting ---------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts; shared (tied) tensors are counted once."""
        trainable = total = 0
        for p in self.parameters():
            # A 4-bit weight (bitsandbytes Params4bit) packs two values per byte; count the values, as peft does.
            n = p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def trainable_parameters_table(self, adapter_name: str | None = None) -> str:
        """One row per adapted module of an adapter (the active one by default): its tensors and counts."""
        name = adapter_name or self.routing.active
        tuner = self._tuner(name)
        rows: dict[str, list[tuple[str, nn.Parameter]]] = {}
        marker = f".adapters.{name}."
        for pname, p in tuner.named_parameters():
            if marker in pname:
                module, tensor = pname.split(marker, 1)
            else:
                module, _, tensor = pname.rpartition(".")
            rows.setdefault(module, []).append((tensor, p))
        width = max([len(m) for m in rows] + [6])
        lines = [f"{'module':<{width}}  {'tensors':<40}  {'params':>12}", "-" * (width + 56)]
        total = 0
        for module, tensors in rows.items():
            count = sum(p.numel() for _, p in tensors)
            total += count
            shapes = ", ".join(f"{t} {tuple(p.shape)}" for t, p in tensors)
            lines.append(f"{module:<{width}}  {shapes:<40}  {count:>12,d}")
        adapter_ids = {id(p) for t in self._tuners.values() for _, p in t.named_parameters()}
        base_total = sum(p.numel() for p in self.parameters() if id(p) not in adapter_ids)
        lines.append("-" * (width + 56))
        lines.append(f"{f'adapter {name!r} ({type(tuner.config).__name__})':<{width + 42}}  {total:>12,d}")
        lines.append(f"{'base model':<{width + 42}}  {base_total:>12,d}")
        return "\n".join(lines)

    # --- files ------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        *,
        safe_serialization: bool = True,
        is_main_process: bool = True,
        adapter_tensors: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` (``peft``'s layout:
        ``default`` at the top, other adapters in sub-folders named after them).

        ``base_model_name_or_path`` records where the base model comes from: its Hugging Face id (catalogue
        models included) or the absolute path of a local directory. A causal LM's LoRA adapter that vLLM
        would refuse to load gets a :class:`~peftkit.io.vllm.VllmCompatibilityWarning` saying why.
        ``is_main_process=False`` writes nothing (the other ranks of a distributed run), as in ``peft``.
        ``adapter_tensors``: the tensors to write instead of the adapter's own, keyed as in the file (a sharded
        run's adapter, gathered from every process); only with one adapter selected. (``peft``'s ``state_dict``,
        a whole model's state dict to pick the adapter from, is not taken.)
        """
        if kwargs:
            raise TypeError(f"save_pretrained() got options peftkit does not have: {', '.join(sorted(kwargs))}.")
        if not safe_serialization:
            raise ValueError("peftkit writes adapters as safetensors only (a pickle can run code when loaded); "
                             "drop safe_serialization=False.")
        if not is_main_process:
            return
        names = selected_adapters or list(self._tuners)
        if adapter_tensors is not None and len(names) != 1:
            raise ValueError(f"save_pretrained(adapter_tensors=...) writes one adapter; this model has {len(names)}: "
                             "pass selected_adapters=[name].")
        save_directory = Path(save_directory)
        if save_directory.exists() and not save_directory.is_dir():
            raise NotADirectoryError(f"{save_directory} exists and is not a directory.")
        for name in names:
            tuner = self._tuner(name)
            config = tuner.config_dict()
            config["inference_mode"] = True
            config["task_type"] = config.get("task_type") or infer_task_type(self.get_base_model())
            config["base_model_name_or_path"] = config.get("base_model_name_or_path") or recorded_name(
                _name_or_path(self.get_base_model())
            )
            tensors = tuner.state_dict()
            if adapter_tensors is not None:
                if set(adapter_tensors) != set(tensors):
                    raise ValueError(f"save_pretrained(adapter_tensors=...): the keys differ from adapter {name!r}'s "
                                     f"(missing {sorted(set(tensors) - set(adapter_tensors))[:3]}, "
                                     f"unexpected {sorted(set(adapter_tensors) - set(tensors))[:3]}).")
                tensors = adapter_tensors
            where = save_directory if name == "default" else save_directory / name
            save_adapter_files(where, config, tensors)
            # vLLM serves generative models; a classifier's adapter (its head under modules_to_save) is not for it.
            serving = config.get("peft_type") == "LORA" and config["task_type"] == "CAUSAL_LM"
            problems = vllm_problems(config, tensors) if serving else []
            if problems:
                warnings.warn(f"{where}: vLLM will not load adapter {name!r}: {'; '.join(problems)}.",
                              VllmCompatibilityWarning, stacklevel=2)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        selected_adapters: list[str] | None = None,
    ) -> Any:
        """Upload the adapter files (what ``save_pretrained`` writes, never the base model) to the Hugging
        Face Hub repository ``repo_id``, creating it if needed. Returns the commit's information."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory(prefix="peftkit-push-") as folder:
            self.save_pretrained(folder, selected_adapters)
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload adapter",
                commit_description=commit_description, revision=revision, create_pr=create_pr,
            )

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
        check_values: bool = True,
    ) -> "PeftModel":
        """Attach the adapter saved in ``model_id`` (a directory) to ``model``. Frozen unless ``is_trainable``.
        ``check_values=False`` loads weights holding NaN/inf or integers, which are refused by default."""
        config, tensors = _read_adapter(model_id, is_trainable, check_values)
        with _unchanged_on_error(model):
            peft_model = cls(model, config, adapter_name)
            try:
                peft_model._tuners[adapter_name].load_state_dict(tensors, source=str(model_id))
            except BaseException:
                peft_model.unload()
                raise
        return peft_model

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, check_values: bool = True
    ) -> None:
        """Attach a saved adapter under another name; ``set_adapter(adapter_name)`` to use it.
        ``check_values=False`` loads weights holding NaN/inf or integers, which are refused by default."""
        config, tensors = _read_adapter(model_id, is_trainable, check_values)
        with _unchanged_on_error(self):
            self.add_adapter(adapter_name, config)
            try:
                self._tuners[adapter_name].load_state_dict(tensors, source=str(model_id))
            except BaseException:
                self.delete_adapter(adapter_name)
                raise

    def check_mixed_batch(self, adapter_names: list[str]) -> None:
        """Raise ValueError unless every named adapter can serve some rows of a batch while other rows run
        other adapters (``forward(adapter_names=...)``). Each adapter decides for itself: a LoRA that trains
        the base model's biases cannot, whatever other LoRAs can."""
        for name in set(adapter_names) - {BASE}:
            tuner = self._tuner(name)
            if not tuner.mixed_batch:
                raise ValueError(f"Adapter {name!r} ({type(tuner.config).__name__}) cannot share a batch with other adapters.")


@contextlib.contextmanager
def _unchanged_on_error(module: nn.Module) -> Iterator[None]:
    """If the block raises, put back what attaching an adapter changes besides the module tree: each
    parameter's ``requires_grad`` and each submodule's training flag. (The tree and the weights are the
    tuners' own promise: they build everything before they touch the model, and check before they write.)"""
    grads = [(p, p.requires_grad) for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    except BaseException:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        raise


def _keyword_inputs(fn: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """``fn(*args, **kwargs)`` as ``fn(**kwargs)``: positional arguments named after ``fn``'s parameters.
    Left as they are when ``fn`` takes them positionally only (``*args``), so the call behaves as before."""
    if not args:
        return args, kwargs
    names = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL):
            return args, kwargs
        if p.kind == p.POSITIONAL_OR_KEYWORD:
            names.append(p.name)
    if len(args) > len(names):
        return args, kwargs
    bound = dict(zip(names, args))
    twice = sorted(set(bound) & set(kwargs))
    if twice:
        raise TypeError(f"{getattr(fn, '__name__', 'forward')}() got multiple values for {', '.join(twice)}.")
    return (), {**bound, **kwargs}


def _is_position_mask(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.ndim == 2


def _mask_virtual_tokens(keep: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """A ``logits_to_keep`` mask (B, T) over the caller's tokens, widened with ``False`` for the virtual
    tokens a soft prompt prepended to the inputs (B, P + T): they predict nothing the caller asked for."""
    sequence = inputs.get("inputs_embeds") if inputs.get("inputs_embeds") is not None else inputs.get("input_ids")
    added = sequence.shape[1] - keep.shape[1] if sequence is not None else 0
    return nn.functional.pad(keep, (added, 0), value=False) if added > 0 else keep


def _read_adapter(
    path: str | os.PathLike, is_trainable: bool, check_values: bool = True
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    data = load_adapter_config(path)
    data["inference_mode"] = not is_trainable
    config = config_from_dict(data, source=str(Path(path) / "adapter_config.json"))
    tensors = load_adapter_tensors(path)
    if check_values:
        check_adapter_values(tensors, path)
    return config, tensors


def _name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze ``model`` and attach one trainable adapter described by ``peft_config``."""
    return PeftModel(model, peft_config, adapter_name)
