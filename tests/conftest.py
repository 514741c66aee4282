"""Tiny, randomly initialised transformers models (built from configs, no downloads) and their inputs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

transformers.logging.set_verbosity_error()
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
DIALOGSUM = REPO.parent / "shared" / "data" / "dialogsum"
VOCAB = 128


@dataclass
class Arch:
    name: str
    build: callable  # () -> model, seeded
    seq2seq: bool = False
    lm: bool = True  # has an LM head (generate works)


def _t5():
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(cfg)


def _bart():
    cfg = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )
    return transformers.BartForConditionalGeneration(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
    )
    return transformers.BertModel(cfg)


ARCHS = {
    "t5": Arch("t5", _t5, seq2seq=True),
    "bart": Arch("bart", _bart, seq2seq=True),
    "gpt2": Arch("gpt2", _gpt2),
    "llama": Arch("llama", _llama),
    "bert": Arch("bert", _bert, lm=False),
}
LM_ARCHS = [a for a in ARCHS if ARCHS[a].lm]


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHS[arch].build().eval()


def inputs(arch: str, batch: int = 2, length: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if ARCHS[arch].seq2seq:
        out["labels"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    elif ARCHS[arch].lm:
        out["labels"] = ids.clone()
    return out


def output(model, batch: dict, **kw) -> torch.Tensor:
    """The tensor to compare: LM logits, or the last hidden state for an encoder."""
    with torch.no_grad():
        out = model(**batch, **kw)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def assert_mixed_rows_match_alone(model, batch: dict, names: list[str], tol: float) -> None:
    """A mixed batch (``adapter_names=names``) gives each row what that row's adapter gives it alone
    (``"__base__"``: the model with adapters disabled)."""
    mixed = output(model, batch, adapter_names=names)
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        if name == "__base__":
            with model.disable_adapter():
                alone = output(model, row)
        else:
            model.set_adapter(name)
            alone = output(model, row)
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=tol, atol=tol)


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture(params=LM_ARCHS)
def lm_arch(request) -> str:
    return request.param
