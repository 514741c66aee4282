"""What the soft-prompt methods (prompt tuning, P-tuning, prefix tuning) share.

A soft prompt leaves every weight of the model alone and changes only what the model sees: ``P``
trainable *virtual tokens* that are either prepended to the input embeddings (prompt tuning, P-tuning)
or prepended to the keys and values of attention layers (prefix tuning)::

    input ids (B, L) --embed--> (B, L, d) --cat--> (B, P + L, d)   prompt tuning / P-tuning
                                  prompts (P, d) --'
    attention mask (B, L) -----------------------> (B, P + L)      ones for the virtual tokens
    labels (B, L) (causal LMs) ------------------> (B, P + L)      -100 for the virtual tokens

The virtual tokens live in a small module per adapter, ``PeftModel.prompt_encoder[<name>]`` (the name
``peft`` uses), computed by ``forward()`` as a ``(rows, width)`` tensor. A method may compute them
through a reparameterization network (an MLP) while training; the file then holds the network's
output, ``prompt_embeddings``, as ``peft`` writes it, and an adapter loaded for inference is just
that tensor (the network is "folded away").

The configs keep ``peft``'s field names, including the model-shape fields ``peft`` writes
(``token_dim``, ``num_layers``, ``num_attention_heads``, ``num_transformer_submodules``). Left at
``None`` they are read from the model; when set (e.g. by a file) they must agree with the model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PeftConfig
from ..model import infer_task_type
from ..tuner import Tuner

SUPPORTED_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


def _positive_int(value: Any, field_name: str, owner: str, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {field_name} must be an integer >= 1{' or None' if optional else ''}, got {value!r}.")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every soft-prompt config shares (names as in ``peft.PromptLearningConfig``).

    Args:
        num_virtual_tokens: Number of virtual tokens ``P``. More tokens give the prompt more capacity
            but make every sequence ``P`` tokens longer; 10-100 is typical.
        token_dim: Width of one virtual token: the embedding width (prompt tuning, P-tuning) or the
            key/value width of one attention layer (prefix tuning). ``None`` reads it from the model.
        num_transformer_submodules: ``peft``'s count of transformer stacks that get virtual tokens:
            ``None`` takes the method's default (see each method); files written by ``peft`` set it.
        num_attention_heads: Key/value heads of an attention layer (prefix tuning). ``None``: from the model.
        num_layers: Number of transformer layers (prefix tuning: layers holding a prefix). ``None``: from the model.
    """

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        _positive_int(self.num_virtual_tokens, "num_virtual_tokens", owner, optional=False)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _positive_int(getattr(self, name), name, owner)
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(f"{owner}: num_transformer_submodules must be 1, 2 or None, got {self.num_transformer_submodules!r}.")


# --- the model's shape -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What a soft prompt needs to know about a transformers model.

    ``num_layers`` / ``num_heads`` / ``num_kv_heads`` / ``head_dim`` describe the attention layers that
    hold a key/value cache: the decoder's on an encoder-decoder model.
    """

    task_type: str
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    peft_num_layers: int  # what ``peft`` writes as num_layers: config.num_hidden_layers (the encoder's on seq2seq)
    peft_num_heads: int  # what ``peft`` writes as num_attention_heads for prompt tuning / P-tuning

    @property
    def seq2seq(self) -> bool:
        return self.task_type == "SEQ_2_SEQ_LM"


def model_shape(model: nn.Module, config: PromptLearningConfig) -> ModelShape:
    """Read the shape of ``model``; refuse models whose task soft prompts do not support here."""
    method = type(config).__name__
    inferred = infer_task_type(model)
    task = config.task_type or inferred
    if task not in SUPPORTED_TASKS or inferred not in SUPPORTED_TASKS:
        raise ValueError(
            f"{method}: peftkit's soft prompts support causal LMs and encoder-decoder LMs (task_type CAUSAL_LM or "
            f"SEQ_2_SEQ_LM), not encoder-only models such as BERT or classification heads; {type(model).__name__} is a "
            f"{inferred or 'non-transformers'} model. Use a method that adapts layers (LoRA, IA3, ...) for it."
        )
    if task != inferred:
        raise ValueError(f"{method}: task_type={task!r} but {type(model).__name__} is a {inferred} model; set task_type=None to infer it.")
    mc = model.config
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(f"{method}: {type(model).__name__}'s input embeddings are a {type(embeddings).__name__}, not nn.Embedding.")
    seq2seq = task == "SEQ_2_SEQ_LM"
    num_layers = mc.num_hidden_layers
    num_heads = mc.num_attention_heads
    if seq2seq:  # the decoder holds the cache
        num_layers = getattr(mc, "num_decoder_layers", None) or getattr(mc, "decoder_layers", None) or num_layers
        num_heads = getattr(mc, "decoder_attention_heads", None) or num_heads
    num_kv_heads = getattr(mc, "num_key_value_heads", None) or num_heads
    head_dim = getattr(mc, "head_dim", None) or getattr(mc, "d_kv", None) or mc.hidden_size // num_heads
    return ModelShape(
        task_type=task,
        embed_dim=embeddings.embedding_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        peft_num_layers=mc.num_hidden_layers,
        peft_num_heads=mc.num_attention_heads,
    )


def check_against_model(config: PromptLearningConfig, resolved: dict[str, int]) -> None:
    """Fields set in the config (e.g. by a file) must match what the model needs."""
    for name, value in resolved.items():
        given = getattr(config, name)
        if given is not None and given != value:
            raise ValueError(
                f"{type(config).__name__}: {name}={given} but this model needs {name}={value}. "
                "The adapter was most likely made for a different base model; set the field to None to read it from the model."
            )


# --- the module holding the virtual tokens -------------------------------------------------------------
class VirtualTokens(nn.Module):
    """``embedding`` (rows x in_width), optionally followed by a reparameterization ``head``.

    ``forward()`` -> (rows, out_width): the virtual-token values the model consumes. Computed without a
    batch dimension, so saving the values (``folded()``) gives bit-identical numbers to what a forward used.
    A module built for inference has no head and holds the folded values in ``embedding`` directly.
    """

    def __init__(self, rows: int, in_width: int, head: nn.Module | None = None, head_name: str = "head") -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, in_width)
        self.head_name = head_name if head is not None else None
        if head is not None:
            self.add_module(head_name, head)

    @property
    def head(self) -> nn.Module | None:
        return getattr(self, self.head_name) if self.head_name else None

    def forward(self) -> torch.Tensor:
        values = self.embedding.weight
        return values if self.head is None else self.head(values)

    @torch.no_grad()
    def folded(self) -> torch.Tensor:
        return self().detach().clone()


# --- the tuner all three methods build on ---------------------------------------------------------------
class SoftPromptTuner(Tuner):
    """A soft prompt: a :class:`VirtualTokens` module in ``PeftModel.prompt_encoder[<name>]`` and a
    ``prepare_inputs`` that hands it to the model. Subclasses provide ``resolve()``, ``make_tokens()`` and
    ``prepare_inputs()``.

    Not mergeable (there is no weight to fold into) and not usable in a mixed batch (the virtual tokens
    change the sequence length of every row).
    """

    mergeable = False
    mixed_batch = False
    container: ClassVar[str] = "prompt_encoder"
    checked_fields: ClassVar[tuple[str, ...]] = ("token_dim",)
    """Resolved fields that a config/file may set but must then agree with the model."""

    def __init__(self, peft_model, name: str, config: PromptLearningConfig) -> None:
        super().__init__(peft_model, name, config)
        self.shape = model_shape(self.model, config)
        self.resolved = self.resolve()
        check_against_model(config, {k: v for k, v in self.resolved.items() if k in self.checked_fields})
        tokens = self.make_tokens()
        tokens.to(self.word_embeddings.weight.device)
        if self.container not in peft_model._modules:
            peft_model.add_module(self.container, nn.ModuleDict())
        peft_model._modules[self.container][name] = tokens

    # --- what a method provides -----------------------------------------------------------------------
    def resolve(self) -> dict[str, Any]:
        """The ``peft`` model-shape fields for this model (written to adapter_config.json)."""
        raise NotImplementedError

    def make_tokens(self) -> VirtualTokens:
        raise NotImplementedError

    # --- the contract ----------------------------------------------------------------------------------
    @property
    def tokens(self) -> VirtualTokens:
        return self.peft_model._modules[self.container][self.name]

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{self.container}.{self.name}.{n}", p) for n, p in self.tokens.named_parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.tokens.folded()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        method = type(self.config).__name__
        if set(tensors) != {"prompt_embeddings"}:
            raise KeyError(f"{source}: a {method} adapter holds exactly one tensor, 'prompt_embeddings'; found {sorted(tensors)[:5]}.")
        if self.tokens.head is not None:
            raise ValueError(
                f"{source}: the file holds the folded virtual tokens (the output of {method}'s reparameterization "
                "network, as peft saves them), which cannot be turned back into the network to train it further. "
                "Load it with is_trainable=False for inference."
            )
        value, target = tensors["prompt_embeddings"], self.tokens.embedding.weight
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{source}: 'prompt_embeddings' has shape {tuple(value.shape)} but the model expects {tuple(target.shape)} "
                f"(num_virtual_tokens={self.num_virtual_tokens}, {', '.join(f'{k}={v}' for k, v in self.resolved.items())}). "
                "The adapter was most likely trained on a different base model."
            )
        with torch.no_grad():
            target.copy_(value.to(dtype=target.dtype, device=target.device))

    def remove(self) -> None:
        container = self.peft_model._modules.get(self.container)
        if container is not None and self.name in container:
            del container[self.name]
            if len(container) == 0:
                delattr(self.peft_model, self.container)

    def config_dict(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "task_type": self.shape.task_type, **self.resolved}

    # --- helpers for prepare_inputs --------------------------------------------------------------------
    def cache_key(self) -> str:
        """The name the model's forward gives its key/value cache (``cache`` from transformers 5.2x, else ``past_key_values``)."""
        params = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def given_cache(self, kwargs: dict[str, Any]):
        """A non-empty cache the caller passed: the virtual tokens are in it already (a decoding step)."""
        for key in ("cache", "past_key_values"):
            cache = kwargs.get(key)
            if cache is not None and _cache_length(cache) > 0:
                return cache
        return None

    def batch_and_length(self, kwargs: dict[str, Any], keys: tuple[str, ...] = ("input_ids", "inputs_embeds")) -> tuple[int, int]:
        """(B, L) of the input the virtual tokens join: the first of ``keys`` that is given."""
        if kwargs.get("input_ids") is not None and kwargs.get("inputs_embeds") is not None:
            raise ValueError("Pass either input_ids or inputs_embeds, not both.")
        for key in keys:
            if kwargs.get(key) is not None:
                return kwargs[key].shape[0], kwargs[key].shape[1]
        raise ValueError(f"{type(self.config).__name__} needs one of {', '.join(keys)} to add its virtual tokens to.")


def _cache_length(cache) -> int:
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # a legacy tuple of (key, value) per layer


def extend_mask(mask: torch.Tensor | None, batch: int, length: int, num_virtual: int, device: torch.device) -> torch.Tensor:
    """(B, L) -> (B, P + L) with ones for the virtual tokens; an all-ones mask when ``mask`` is None."""
    if mask is None:
        return torch.ones(batch, num_virtual + length, dtype=torch.long, device=device)
    if mask.dim() != 2:
        raise ValueError(f"Soft prompts need a 2D (batch, length) attention mask to extend; got shape {tuple(mask.shape)}.")
    return torch.cat([mask.new_ones(mask.shape[0], num_virtual), mask], dim=1)


def generation_expand_size(model: nn.Module, kwargs: dict[str, Any]) -> int:
    """How many rows ``generate`` makes of each input row (beams / returned sequences)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
    sequences = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
    return max(beams, sequences)


class InputPromptTuner(SoftPromptTuner):
    """Prompt tuning and P-tuning: the virtual tokens are prepended to the input embeddings.

    Causal LM: ``inputs_embeds`` (B, P + L, d), attention mask (B, P + L), labels (B, P + L) with -100
    on the virtual positions, so the logits are (B, P + L, vocab). Encoder-decoder: the encoder input
    gets the virtual tokens; decoder inputs and labels are unchanged.

    ``num_transformer_submodules`` defaults to 1. ``peft`` sets 2 on encoder-decoder models and then
    stores ``2 P`` rows of which it uses the first ``P`` (the encoder's); such files load here too.
    """

    def num_rows(self) -> int:
        return self.num_virtual_tokens * self.resolved["num_transformer_submodules"]

    def resolve(self) -> dict[str, Any]:
        submodules = self.config.num_transformer_submodules or 1
        if submodules == 2 and not self.shape.seq2seq:
            raise ValueError(f"{type(self.config).__name__}: num_transformer_submodules=2 needs an encoder-decoder model.")
        return {
            "token_dim": self.shape.embed_dim,
            "num_layers": self.config.num_layers or self.shape.peft_num_layers,
            "num_attention_heads": self.config.num_attention_heads or self.shape.peft_num_heads,
            "num_transformer_submodules": submodules,
        }

    def prepare_inputs(self, kwargs: dict[str, Any], for_generate: bool = False) -> dict[str, Any]:
        kwargs = dict(kwargs)
        P = self.num_virtual_tokens
        for key in ("position_ids", "token_type_ids"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key} cannot be combined with {type(self.config).__name__}: it would need entries for the virtual tokens.")
        batch, length = self.batch_and_length(kwargs)
        device = self.word_embeddings.weight.device
        if not self.shape.seq2seq and self.given_cache(kwargs) is not None:
            # A decoding step: the virtual tokens are in the cache; the mask (if any) must still cover them.
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = extend_mask(kwargs["attention_mask"], batch, length, P, device)
            return kwargs
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = self.word_embeddings(ids)
        prompts = self.tokens()[:P].to(embeds.dtype)  # (P, d)
        kwargs["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)  # (B, P + L, d)
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), batch, length, P, device)
        if not self.shape.seq2seq:
            if for_generate and ids is not None:
                kwargs["input_ids"] = ids  # generate returns them before the new tokens, as without an adapter
            labels = kwargs.get("labels")
            if labels is not None:
                kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], P), -100), labels], dim=1)
        return kwargs
