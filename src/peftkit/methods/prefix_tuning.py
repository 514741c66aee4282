r"""Prefix tuning (Li & Liang, 2021, https://arxiv.org/abs/2101.00190).

Every attention layer gets ``P`` trainable key and value vectors in front of the ones computed from the
input, so each query also attends to the prefix::

    attn(q, [K_prefix ; K], [V_prefix ; V])      K_prefix, V_prefix: (heads, P, head_dim) per layer

The prefixes reach the model as a pre-filled key/value cache (a transformers ``DynamicCache``, or an
``EncoderDecoderCache`` on encoder-decoder models), so positions after the prefix start at ``P``; the
attention mask gets ``P`` ones in front. All prefixes are one tensor of (P, 2 * layers * kv_dim),
``prompt_embeddings`` on disk.

With ``encoder_hidden_size`` set, training optimises the prefix through a reparameterization MLP
(``peft``'s ``prefix_projection``), which the paper found more stable than the raw prefix::

    E (P x kv_dim) --Linear(kv_dim, h)--Tanh--Linear(h, 2 * layers * kv_dim)--> prefix

``save_pretrained`` folds the MLP away: the file holds its output, and an adapter loaded for inference
is that tensor alone (same outputs, fewer parameters, no MLP to run).

Encoder-decoder models: as in ``peft``, the prefix goes to the decoder's self-attention (the encoder
and the cross-attention run as usual), and ``peft``'s layout is kept so files move both ways: the
(2 * layers) key/value rows are read twice over, in chunks of four, and decoder layer ``i`` takes
rows ``4i mod 2L`` (keys) and ``4i+1 mod 2L`` (values). With an even number of layers, half the rows
are therefore unused and layers share prefixes; that is ``peft``'s format, reproduced for parity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..presets import Preset, register_preset
from ..registry import register
from .soft_prompt import (
    PromptLearningConfig,
    SoftPromptTuner,
    VirtualTokens,
    _positive_int,
    extend_mask,
    generation_expand_size,
)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Configuration of prefix tuning (fields as in ``peft.PrefixTuningConfig``).

    Args:
        num_virtual_tokens: Prefix length ``P`` in every attention layer.
        encoder_hidden_size: Hidden width ``h`` of the reparameterization MLP used while training. ``None``
            (default) trains the prefix directly. Saved adapters never contain the MLP.
        prefix_projection: ``peft``'s switch for the MLP. ``None`` (default): on exactly when
            ``encoder_hidden_size`` is set. ``peft`` files set it explicitly (and may carry an
            ``encoder_hidden_size`` that is then unused); ``True`` without ``encoder_hidden_size`` uses ``h = token_dim``.
        num_transformer_submodules: ``peft``'s layout switch: 1 for causal LMs, 2 for encoder-decoder
            models (see the module docstring). ``None`` picks the one the model needs.
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self.encoder_hidden_size, "encoder_hidden_size", "PrefixTuningConfig")
        if self.prefix_projection not in (None, True, False):
            raise ValueError(f"PrefixTuningConfig: prefix_projection must be True, False or None, got {self.prefix_projection!r}.")

    @property
    def uses_projection(self) -> bool:
        return self.prefix_projection if self.prefix_projection is not None else self.encoder_hidden_size is not None


class PrefixTuningTuner(SoftPromptTuner):
    """Attaches a :class:`PrefixTuningConfig`: ``embedding`` (P, 2 L kv_dim), or (P, kv_dim) followed by
    the ``transform`` MLP while training with ``encoder_hidden_size``."""

    checked_fields = ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")

    def __init__(self, peft_model, name: str, config: PrefixTuningConfig) -> None:
        if any(getattr(m, "gradient_checkpointing", False) for m in peft_model.get_base_model().modules()):
            raise ValueError("PrefixTuningConfig does not work with gradient checkpointing (the prefix is a cache); turn it off.")
        super().__init__(peft_model, name, config)

    def resolve(self) -> dict[str, Any]:
        s = self.shape
        return {
            "token_dim": s.num_kv_heads * s.head_dim,
            "num_layers": s.num_layers,
            "num_attention_heads": s.num_kv_heads,
            "num_transformer_submodules": 2 if s.seq2seq else 1,
        }

    def make_tokens(self) -> VirtualTokens:
        kv_dim, L, P = self.resolved["token_dim"], self.resolved["num_layers"], self.num_virtual_tokens
        if self.config.uses_projection and not self.config.inference_mode:
            h = self.config.encoder_hidden_size or kv_dim
            head = nn.Sequential(nn.Linear(kv_dim, h), nn.Tanh(), nn.Linear(h, 2 * L * kv_dim))
            return VirtualTokens(P, kv_dim, head, head_name="transform")
        return VirtualTokens(P, 2 * L * kv_dim)

    def config_dict(self) -> dict[str, Any]:
        return {**super().config_dict(), "prefix_projection": self.config.uses_projection}

    # --- the prefix as a cache ----------------------------------------------------------------------------
    def prefix_cache(self, batch: int):
        """A fresh cache holding the prefix of every layer for ``batch`` rows (keys/values (B, heads, P, head_dim))."""
        from transformers import DynamicCache, EncoderDecoderCache

        s, P = self.shape, self.num_virtual_tokens
        dtype = self.word_embeddings.weight.dtype
        values = self.tokens().to(dtype)  # (P, 2 L kv_dim)
        kv = values.view(P, 2 * s.num_layers, s.num_kv_heads, s.head_dim).permute(1, 2, 0, 3)  # (2L, heads, P, head_dim)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, heads, P, head_dim)
        rows = 2 * s.num_layers
        if not s.seq2seq:
            return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(s.num_layers)])
        layers = [(kv[(4 * i) % rows], kv[(4 * i + 1) % rows]) for i in range(s.num_layers)]  # peft's layout, see above
        return EncoderDecoderCache(DynamicCache(layers), DynamicCache())

    def prepare_inputs(self, kwargs: dict[str, Any], for_generate: bool = False) -> dict[str, Any]:
        """Causal LM: cache = prefix, attention mask (B, P + L). Encoder-decoder: cache = prefix for the
        decoder, decoder attention mask (if given) (B, P + T). Logits and labels keep their shapes."""
        kwargs = dict(kwargs)
        P = self.num_virtual_tokens
        inputs = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")
        batch, length = self.batch_and_length(kwargs, inputs if self.shape.seq2seq else inputs[:2])
        device = self.word_embeddings.weight.device
        continuing = self.given_cache(kwargs) is not None  # a decoding step: the prefix is in the cache already
        if not continuing:
            expand = generation_expand_size(self.model, kwargs) if for_generate else 1
            for key in ("cache", "past_key_values"):
                kwargs.pop(key, None)
            kwargs[self.cache_key()] = self.prefix_cache(batch * expand)
        if not self.shape.seq2seq:
            if not (continuing and kwargs.get("attention_mask") is None):
                kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), batch, length, P, device)
        elif kwargs.get("decoder_attention_mask") is not None:
            mask = kwargs["decoder_attention_mask"]
            kwargs["decoder_attention_mask"] = extend_mask(mask, mask.shape[0], mask.shape[1], P, device)
        return kwargs


register(PrefixTuningConfig, PrefixTuningTuner)
register_preset(
    Preset(
        "prefix_tuning",
        lambda o: PrefixTuningConfig(num_virtual_tokens=o.num_virtual_tokens, encoder_hidden_size=o.encoder_hidden_size),
        uses=frozenset({"num_virtual_tokens", "encoder_hidden_size"}),
        help="prefix tuning: trained key/value prefixes in every (decoder) self-attention layer; optional MLP, folded on save",
        default_lr=1e-2,
    )
)
