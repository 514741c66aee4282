"""Offline stand-ins for the training/evaluation pipeline tests: a word-level tokenizer (built here, never
downloaded), tiny model directories that ``--model`` accepts, and a small learnable dialogue dataset."""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from conftest import VOCAB, build
from peftkit import PeftConfig, registry
from peftkit.data import IGNORE_INDEX
from peftkit.tuner import Tuner

SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]
WORDS = (
    "alice bob carol dave emma frank grace henry person1 person2 asks tells wants needs buys sells finds loses "
    "a the to and of in on for with at from about book car dog cat house phone ticket coffee dinner doctor job "
    "train bus money gift party plan trip meeting today tomorrow yes no not please thanks sure okay i you we they "
    "he she it is are was will can my your our their new old big small good bad help call visit late early "
    "summarize following conversation summary : # . , ? ! user assistant"
).split()
assert len(SPECIALS) + len(WORDS) <= VOCAB, len(WORDS)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ 'user : ' + m['content'] + ' assistant :' }}{% endfor %}"
)


def tokenizer(seq2seq: bool = False, chat_template: bool = False) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if seq2seq:  # like T5: every encoded text ends with </s>
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def model_dir(root: Path, arch: str = "llama", chat_template: bool = False, seed: int = 0) -> str:
    """A saved tiny model + tokenizer that ``load_model`` reads like any Hugging Face directory."""
    path = root / f"tiny-{arch}{'-chat' if chat_template else ''}-{seed}"
    if not (path / "config.json").is_file():
        model = build(arch, seed=seed)
        model.save_pretrained(path)
        tokenizer(seq2seq=model.config.is_encoder_decoder, chat_template=chat_template).save_pretrained(path)
    return str(path)


NAMES = "alice bob carol dave emma frank grace henry".split()
THINGS = "book car dog cat house phone ticket coffee dinner gift".split()
VERBS = "buys sells finds loses wants needs".split()


def dialogue_rows(n: int, seed: int = 0, references: int = 1) -> list[dict]:
    """Rows with ``dialogue`` and ``summary`` (or ``summary1..k``): the summary restates who does what,
    which a tiny model can learn from the dialogue in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        who, verb, thing = rng.choice(NAMES), rng.choice(VERBS), rng.choice(THINGS)
        filler = " ".join(rng.choice(["okay", "sure", "thanks", "please", "yes", "no"]) for _ in range(rng.randint(1, 12)))
        dialogue = f"# person1 # : {who} {verb} a {thing} today ? # person2 # : yes {filler} ."
        summary = f"{who} {verb} a {thing} ."
        row = {"dialogue": dialogue, "topic": thing}
        if references == 1:
            row["summary"] = summary
        else:
            for k in range(1, references + 1):
                row[f"summary{k}"] = summary if k == 1 else f"{who} {verb} the {thing} today ."
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --- a minimal soft-prompt method, registered only inside `with soft_prompt_method():` ----------------------
@dataclass
class _SoftPromptConfig(PeftConfig):
    peft_type: ClassVar[str] = "TEST_SOFT_PROMPT"
    num_virtual_tokens: int = 3


class _SoftPromptTuner(Tuner):
    """A minimal soft prompt: like the real ones, it prepends virtual tokens inside PeftModel.forward
    and extends attention_mask and labels there."""

    def __init__(self, peft_model, name, config):
        super().__init__(peft_model, name, config)
        dim = self.model.get_input_embeddings().embedding_dim
        self.prompt = nn.Parameter(torch.randn(config.num_virtual_tokens, dim) * 0.5)

    def named_parameters(self):
        return [("prompt", self.prompt)]

    def state_dict(self):
        return {"prompt_embeddings": self.prompt}

    def load_state_dict(self, tensors, source):
        self.prompt.data.copy_(tensors["prompt_embeddings"])

    def remove(self):
        pass

    def prepare_inputs(self, kwargs, for_generate=False):
        embeds = self.model.get_input_embeddings()(kwargs.pop("input_ids"))  # generate gets embeddings only
        b, n = embeds.shape[0], self.prompt.shape[0]
        kwargs["inputs_embeds"] = torch.cat([self.prompt.expand(b, -1, -1), embeds], dim=1)
        kwargs["attention_mask"] = torch.cat([torch.ones(b, n, dtype=torch.long), kwargs["attention_mask"]], dim=1)
        if kwargs.get("labels") is not None:
            kwargs["labels"] = torch.cat([torch.full((b, n), IGNORE_INDEX), kwargs["labels"]], dim=1)
        return kwargs


@contextlib.contextmanager
def soft_prompt_method():
    """Register the test soft prompt for the duration of a test (so registry-wide tests never see it)."""
    registry.register(_SoftPromptConfig, _SoftPromptTuner)
    try:
        yield _SoftPromptConfig
    finally:
        registry._CONFIGS.pop(_SoftPromptConfig.peft_type, None)
        registry._TUNERS.pop(_SoftPromptConfig, None)
