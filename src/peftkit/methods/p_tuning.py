r"""P-tuning (Liu et al., 2021, "GPT Understands, Too", https://arxiv.org/abs/2103.10385).

Like prompt tuning, ``P`` virtual-token embeddings are prepended to the input embeddings, but they are
produced by a small *prompt encoder* from trainable inputs, which makes optimisation more stable::

    E (P x d) --Linear(d, h)--ReLU--Linear(h, h)--ReLU--Linear(h, d)--> prompts (P x d)

(``peft``'s MLP, with ``h = encoder_hidden_size``.) Only the encoder's output is needed at inference:
``save_pretrained`` writes it as ``prompt_embeddings`` (as ``peft`` does) and an adapter loaded for
inference holds just that (P x d) tensor. A saved adapter therefore cannot be trained further as
P-tuning; start a new one or train those embeddings with prompt tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from ..registry import Preset, register
from .soft_prompt import InputPromptTuner, PromptLearningConfig, VirtualTokens, _positive_int


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """Configuration of P-tuning (fields as in ``peft.PromptEncoderConfig``).

    Args:
        num_virtual_tokens: Number of virtual tokens ``P`` prepended to every input.
        encoder_hidden_size: Width ``h`` of the prompt encoder's hidden layers. Larger is more expressive
            while training; it costs nothing at inference (only the output is kept).
        encoder_reparameterization_type: ``"MLP"``. ``peft``'s ``"LSTM"`` encoders are accepted only for
            loading a saved adapter for inference (the file holds the encoder's output, whatever the encoder).
        encoder_num_layers: Kept for ``peft`` files; the MLP always has ``peft``'s 2 hidden layers, so any other
            value is refused for training.
        encoder_dropout: Kept for ``peft`` files; ``peft``'s MLP has no dropout, so only 0 is accepted for training.
    """

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_hidden_size: int = 128
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self.encoder_hidden_size, "encoder_hidden_size", "PromptEncoderConfig", optional=False)
        kind = self.encoder_reparameterization_type
        if kind not in ("MLP", "LSTM"):
            raise ValueError(f"PromptEncoderConfig: encoder_reparameterization_type must be 'MLP', got {kind!r}.")
        if self.inference_mode:
            return  # a saved adapter is the encoder's output; how it was computed no longer matters
        if kind == "LSTM":
            raise ValueError(
                "PromptEncoderConfig: peftkit trains P-tuning with the MLP encoder only; set "
                "encoder_reparameterization_type='MLP' (LSTM adapters saved by peft load for inference)."
            )
        if self.encoder_num_layers != 2:
            raise ValueError(f"PromptEncoderConfig: the MLP encoder has 2 hidden layers (as in peft); encoder_num_layers={self.encoder_num_layers!r} is not supported, set it to 2.")
        if self.encoder_dropout != 0:
            raise ValueError(f"PromptEncoderConfig: the MLP encoder has no dropout (as in peft); set encoder_dropout=0, got {self.encoder_dropout!r}.")


class PromptEncoderTuner(InputPromptTuner):
    """Attaches a :class:`PromptEncoderConfig`: ``embedding`` (P, d) followed by ``mlp_head`` while training."""

    def make_tokens(self) -> VirtualTokens:
        d, h = self.shape.embed_dim, self.config.encoder_hidden_size
        head = None
        if not self.config.inference_mode:
            head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))
        return VirtualTokens(self.num_rows(), d, head, head_name="mlp_head")


register(PromptEncoderConfig, PromptEncoderTuner,
         Preset("p_tuning", "P-tuning: virtual tokens produced by a small MLP prompt encoder, prepended to the input",
                default_lr=1e-3))
