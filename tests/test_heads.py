"""Task heads: on a ...ForSequenceClassification / ...ForTokenClassification model the newly initialised
head (``classifier`` / ``score``) trains with the adapter and is saved under ``modules_to_save``, as
``peft`` does, so classification adapters move both ways between peftkit and ``peft``."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from conftest import VOCAB
from parity import WEIGHTS, nudge
from safetensors.torch import load_file

from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model

LABELS = 3


def _config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, num_labels=LABELS, pad_token_id=0)
    if arch == "bert":
        return transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    if arch == "roberta":
        return transformers.RobertaConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    if arch == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    return transformers.Qwen2Config(num_key_value_heads=2, **common)


KINDS = {
    "SEQ_CLS": {
        "bert": transformers.BertForSequenceClassification,
        "roberta": transformers.RobertaForSequenceClassification,
        "llama": transformers.LlamaForSequenceClassification,
        "qwen2": transformers.Qwen2ForSequenceClassification,
    },
    "TOKEN_CLS": {"bert": transformers.BertForTokenClassification, "llama": transformers.LlamaForTokenClassification},
}
HEAD = {"bert": "classifier", "roberta": "classifier", "llama": "score", "qwen2": "score"}
CASES = [(task, arch) for task in KINDS for arch in KINDS[task]]


def build_classifier(task: str, arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return KINDS[task][arch](_config(arch)).eval()


def batch(seed: int = 1) -> dict:
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, data: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**data).logits


@pytest.mark.parametrize("task,arch", CASES)
def test_classification_adapters_move_both_ways_with_equal_logits(task, arch, tmp_path):
    data = batch()
    base = build_classifier(task, arch)
    ours = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False))
    assert any(n.startswith(HEAD[arch] + ".adapters.") and p.requires_grad for n, p in base.named_parameters())
    nudge(ours)  # moves the LoRA weights and the head copy: a head left out of the file would show up
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["task_type"] == task and set(saved["modules_to_save"]) == {"classifier", "score"}
    keys = load_file(str(tmp_path / "ours" / WEIGHTS)).keys()
    assert f"base_model.model.{HEAD[arch]}.{'out_proj.' if arch == 'roberta' else ''}weight" in keys
    reference = peft.PeftModel.from_pretrained(build_classifier(task, arch), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(reference, data), logits(ours, data), rtol=1e-5, atol=1e-5)
    with ours.disable_adapter():  # the base head is untouched underneath the trained copy
        torch.testing.assert_close(logits(ours, data), logits(build_classifier(task, arch), data))

    theirs = peft.get_peft_model(build_classifier(task, arch), peft.LoraConfig(task_type=task, r=4, init_lora_weights=False))
    nudge(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(build_classifier(task, arch), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded, data), logits(theirs.eval(), data), rtol=1e-5, atol=1e-5)


def test_the_head_trains_and_is_saved(tmp_path):
    base = build_classifier("SEQ_CLS", "llama")
    model = get_peft_model(base, LoraConfig(r=4))
    head = {n: p for n, p in base.named_parameters() if n.startswith("score.adapters.")}
    assert head and all(p.requires_grad for p in head.values())
    before = {n: p.detach().clone() for n, p in head.items()}
    original = base.score.base_layer.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        out = model(**batch(), labels=torch.tensor([0, 2]))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in head.items())
    assert torch.equal(base.score.base_layer.weight, original)  # the base head stays as it was
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(load_file(str(tmp_path / WEIGHTS))["base_model.model.score.weight"], head["score.adapters.default.module.weight"].detach())


def test_user_modules_to_save_are_kept_and_heads_are_never_lora_targets(tmp_path):
    model = get_peft_model(
        build_classifier("SEQ_CLS", "roberta"),
        IA3Config(target_modules="all-linear", feedforward_modules=["intermediate.dense"], modules_to_save=["word_embeddings"]),
    )
    paths = model._tuners["default"].paths
    assert "classifier" in paths and not any(p.startswith("classifier.") for p in paths)  # out_proj stays in the copy
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["word_embeddings", "classifier", "score"]


def test_a_model_without_a_head_is_unchanged():
    torch.manual_seed(0)
    model = get_peft_model(transformers.BertModel(_config("bert")), LoraConfig(r=4))
    assert not any(".module." in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="matches no module"):
        get_peft_model(build_classifier("SEQ_CLS", "bert"), LoraConfig(r=4, modules_to_save=["nothing_here"]))
