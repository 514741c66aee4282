"""Forgetting, measured: the arithmetic on tiny models, the BBC News selection, the Pareto front, and a
finished comparison that gets its forgetting measured without training again."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_pipeline as tiny
from conftest import build
from peftkit import LoraConfig, get_peft_model
from peftkit.evaluate.forgetting import (ForgettingSettings, bbc_articles, forgetting, general_texts, mean_token_loss,
                                         topic_accuracy, topic_rows)
from peftkit.experiments import CompareConfig, run_experiment
from peftkit.experiments.config import build_experiment_config
from peftkit.experiments.plots import pareto_front
from peftkit.experiments import worker as worker_module

# General text a tiny word-level tokenizer can spell (the BBC articles would be mostly <unk> to it).
TEXTS = ["alice buys a book today and bob sells a car .", "we visit the doctor tomorrow , thanks .",
         "the dog finds an old phone in the house .", "my new job is good , i can help you ."]


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


def test_a_model_that_does_not_change_has_zero_forgetting(tok):
    model = build("llama")
    before = mean_token_loss(model, tok, TEXTS, max_tokens=16, batch_size=3)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B = 0: no change yet
    after = mean_token_loss(lora, tok, TEXTS, max_tokens=16, batch_size=3)
    assert after == before and before[1] == sum(len(tok(t)["input_ids"]) - 1 for t in TEXTS)
    scores = {"general_loss": before[0], "topic_accuracy": 0.5}
    assert forgetting(scores, scores)["forgetting"] == 0.0 and forgetting(scores, scores)["topic_accuracy_delta"] == 0.0


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_a_model_trained_on_the_general_text_has_negative_forgetting(tok, arch):
    tokenizer = tiny.tokenizer(seq2seq=arch == "t5")
    model = get_peft_model(build(arch), LoraConfig(r=4, target_modules=["q", "v"] if arch == "t5" else ["q_proj", "v_proj"]))
    before, _ = mean_token_loss(model, tokenizer, TEXTS, max_tokens=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    for _ in range(20):
        if arch == "t5":
            empty = tokenizer([""] * len(TEXTS), return_tensors="pt")
            loss = model(input_ids=empty["input_ids"], attention_mask=empty["attention_mask"], labels=labels).loss
        else:
            loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after, _ = mean_token_loss(model, tokenizer, TEXTS, max_tokens=16)
    result = forgetting({"general_loss": before, "topic_accuracy": None}, {"general_loss": after, "topic_accuracy": None})
    assert result["forgetting"] == after - before < -0.2  # it learned this very text
    assert result["topic_accuracy_delta"] is None


def test_the_loss_is_pooled_over_tokens_and_cut_at_max_tokens(tok):
    model = build("llama")
    long, short = TEXTS[0] + " " + TEXTS[1], TEXTS[2]
    loss_long, n_long = mean_token_loss(model, tok, [long], max_tokens=12)
    loss_short, n_short = mean_token_loss(model, tok, [short], max_tokens=12)
    both, n = mean_token_loss(model, tok, [long, short], max_tokens=12, batch_size=2)  # padded together
    assert n_long == 11 and n == n_long + n_short
    assert both == pytest.approx((loss_long * n_long + loss_short * n_short) / n, rel=1e-5)


def test_topic_accuracy_picks_the_label_the_model_finds_most_likely(tok):
    model = build("llama")
    rows = [("alice buys a book", "dog"), ("bob sells a car", "cat"), ("the new house", "phone")]
    labels = sorted({t for _, t in rows})

    def label_log_likelihood(article: str, label: str) -> float:  # a second path: the model's own loss
        prompt = tok("{article}\n\nTopic of this news article (business, entertainment, politics, sports or tech):"
                     .format(article=article))["input_ids"]
        ids = tok(" " + label, add_special_tokens=False)["input_ids"]
        out = model(input_ids=torch.tensor([prompt + ids]), labels=torch.tensor([[-100] * len(prompt) + ids]))
        return -out.loss.item() * len(ids)

    with torch.no_grad():
        expected = sum(max(labels, key=lambda lab: label_log_likelihood(a, lab)) == t for a, t in rows) / len(rows)
    assert topic_accuracy(model, tok, rows, max_tokens=16) == pytest.approx(expected)


def test_the_bbc_texts_are_fixed_real_and_disjoint():
    articles = bbc_articles()
    assert sorted(articles) == ["business", "entertainment", "politics", "sports", "tech"]
    assert sum(map(len, articles.values())) == 2225  # the BBC News corpus
    general, rows = general_texts(10, articles), topic_rows(10, articles)
    assert general == general_texts(10) and rows == topic_rows(10)  # deterministic
    assert not set(general) & {a for a, _ in rows}
    assert [t for _, t in rows[:5]] == sorted(articles) and all(len(t.split()) > 50 for t in general)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="general_texts must be an integer >= 0"):
        ForgettingSettings(general_texts=-1)
    with pytest.raises(ValueError, match="topic_tokens must be"):
        ForgettingSettings(topic_tokens=2)
    assert not ForgettingSettings(general_texts=0, topic_rows=0).enabled


def test_pareto_front():
    points = [(0.10, 5.0), (0.02, 4.0), (0.05, 3.0), (0.30, 6.0), (0.02, 1.0)]
    assert pareto_front(points) == [1, 0, 3]  # (0.05, 3) and (0.02, 1) are beaten by (0.02, 4)


def test_a_finished_comparison_gets_its_forgetting_measured_without_training_again(tmp_path, monkeypatch):
    model = tiny.model_dir(tmp_path, "llama")
    data = tiny.write_jsonl(tmp_path / "d.jsonl", tiny.dialogue_rows(8))
    kw = dict(model=model, train_data=data, eval_data=data, output=str(tmp_path / "out"), methods=["baseline", "lora"],
              max_steps=1, batch_size=4, eval_limit=2, max_new_tokens=2, latency_rows=0, example_rows=0, precision="fp32",
              isolate=False)
    first = run_experiment(build_experiment_config(CompareConfig, **kw, forgetting=ForgettingSettings(general_texts=0, topic_rows=0)))
    assert all(m["forgetting"] is None for m in first["methods"])
    assert "gain_vs_forgetting.png" not in first["plots"]
    monkeypatch.setattr(worker_module, "train", lambda *a, **k: pytest.fail("trained again"))
    second = run_experiment(build_experiment_config(CompareConfig, **kw, forgetting=ForgettingSettings(general_texts=2, general_tokens=16, topic_rows=0)))
    lora = {m["name"]: m for m in second["methods"]}["lora"]
    assert lora["forgetting"] is not None and lora["topic_accuracy"] is None
    assert lora["rouge1"] == first["methods"][1]["rouge1"]  # the evaluation was reused too
    assert json.loads((tmp_path / "out" / "runs" / "lora" / "forgetting.json").read_text())["settings"]["general_texts"] == 2
    assert (tmp_path / "out" / "gain_vs_forgetting.png").is_file()
