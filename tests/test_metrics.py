"""Every metric of peftkit.evaluate.metrics against its own library's output on fixed examples, the
three reference modes (max, mean over references, first), and held-out loss / perplexity in `peftkit eval`."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score
from torchmetrics.functional.text import squad

import tiny_pipeline as tiny
from conftest import build
from peftkit.cli import main
from peftkit.data import PromptFormat, load_encoded
from peftkit.evaluate import METRICS, ROUGE_TYPES, ScoringSettings, check_available, metric_keys, score_text
from peftkit.hub import load_model

# Three references that give three different ROUGE scores, so max, mean and first all differ.
PREDICTIONS = ["tom buys a red car today .", "the meeting moved to noon on friday ."]
REFERENCES = [
    ["mary sells flowers .", "tom buys a car .", "tom buys a red car today ."],
    ["the meeting is at noon .", "the meeting moved to friday noon ."],
]


def _rouge_direct(prediction: str, reference: str) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return {k: s.fmeasure for k, s in scorer.score(reference, prediction).items()}


def test_rouge_reference_modes_match_rouge_score_computed_directly():
    scores, per_example = score_text(PREDICTIONS, REFERENCES, ScoringSettings(metrics=["rouge"], reference_mode="mean"))
    pairs = [[_rouge_direct(p, r) for r in refs] for p, refs in zip(PREDICTIONS, REFERENCES)]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    for k in ROUGE_TYPES:
        best = sum(scorer.score_multi(refs, p)[k].fmeasure for p, refs in zip(PREDICTIONS, REFERENCES)) / 2
        rows = [s[k] for example in pairs for s in example]  # each reference its own row: 5 rows
        first = (pairs[0][0][k] + pairs[1][0][k]) / 2
        assert scores[f"{k}_max"] == pytest.approx(best)
        assert scores[f"{k}_mean"] == pytest.approx(sum(rows) / 5)
        assert scores[f"{k}_first"] == pytest.approx(first)
        assert scores[k] == scores[f"{k}_mean"]  # the headline follows reference_mode
        # per example: the mean over that example's references
        assert per_example[0][k] == pytest.approx(sum(s[k] for s in pairs[0]) / 3)
    # The fixed example is chosen so the three protocols disagree (otherwise the test would prove little).
    assert scores["rouge1_max"] > scores["rouge1_mean"] > scores["rouge1_first"]
    assert scores["rouge1_max"] == pytest.approx((1.0 + pairs[1][1]["rouge1"]) / 2)


def test_one_reference_per_example_makes_the_modes_agree():
    scores, _ = score_text(PREDICTIONS, [[refs[1]] for refs in REFERENCES], ScoringSettings(metrics=list(METRICS)[:7]))
    for k in metric_keys(list(METRICS)[:7]):
        assert scores[f"{k}_max"] == pytest.approx(scores[f"{k}_mean"]) == pytest.approx(scores[f"{k}_first"])


def test_exact_match_and_token_f1_match_torchmetrics_squad():
    predictions = ["The Eiffel Tower", "1889.", "Paris, France"]
    references = [["Eiffel Tower", "the tower"], ["1887", "1889"], ["Lyon"]]
    scores, per_example = score_text(predictions, references, ScoringSettings(metrics=["exact_match", "token_f1"]))
    preds = [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)]
    target = [{"answers": {"text": r, "answer_start": [0] * len(r)}, "id": str(i)} for i, r in enumerate(references)]
    expected = squad(preds, target)  # SQuAD: best reference per question, mean over questions, in percent
    assert scores["exact_match"] == pytest.approx(expected["exact_match"].item() / 100)
    assert scores["token_f1"] == pytest.approx(expected["f1"].item() / 100)
    assert scores["exact_match"] == pytest.approx(2 / 3)  # "The" and "." are dropped by the normalisation; Lyon misses
    assert 0 < scores["token_f1"] < 1 and per_example[2]["token_f1"] == 0.0
    first = squad(preds, [{"answers": {"text": r[:1], "answer_start": [0]}, "id": str(i)} for i, r in enumerate(references)])
    assert scores["exact_match_first"] == pytest.approx(first["exact_match"].item() / 100)


def test_bleu_and_chrf_match_sacrebleu():
    scores, _ = score_text(PREDICTIONS, REFERENCES, ScoringSettings(metrics=["bleu", "chrf"]))
    streams = [[refs[i] if i < len(refs) else None for refs in REFERENCES] for i in range(3)]
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, streams).score / 100)  # max: multi-reference
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, streams).score / 100)
    firsts = [[refs[0] for refs in REFERENCES]]
    assert scores["bleu_first"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, firsts).score / 100)
    pooled = [p for p, refs in zip(PREDICTIONS, REFERENCES) for _ in refs]
    assert scores["chrf_mean"] == pytest.approx(sacrebleu.corpus_chrf(pooled, [[r for refs in REFERENCES for r in refs]]).score / 100)
    assert scores["bleu"] > scores["bleu_first"] and scores["chrf"] > scores["chrf_mean"]


def test_accuracy_and_macro_f1_match_scikit_learn():
    predictions = ["positive", "negative ", "neutral", "positive", "negative"]
    labels = ["positive", "negative", "positive", "negative", "negative"]
    scores, _ = score_text(predictions, [[label] for label in labels], ScoringSettings(metrics=["accuracy", "macro_f1"]))
    stripped = [p.strip() for p in predictions]
    assert scores["accuracy"] == pytest.approx(accuracy_score(labels, stripped)) == pytest.approx(0.6)
    assert scores["macro_f1"] == pytest.approx(f1_score(labels, stripped, average="macro", zero_division=0))


def test_scoring_settings_refuse_bad_input_with_the_fix():
    with pytest.raises(ValueError, match="Unknown metric.*choose from rouge, exact_match"):
        ScoringSettings(metrics=["rouge", "meteor"])
    with pytest.raises(ValueError, match="reference_mode must be one of max, mean, first"):
        ScoringSettings(reference_mode="best")
    with pytest.raises(ValueError, match="--bertscore-model DIR"):
        ScoringSettings(metrics=["bertscore"])
    assert ScoringSettings(metrics="rouge, bleu").metrics == ["rouge", "bleu"]


def test_bertscore_with_a_local_model_matches_bert_score(tmp_path):
    bert_score = pytest.importorskip("bert_score")
    model_dir = tmp_path / "bert"
    build("bert").save_pretrained(model_dir)
    tokenizer = tiny.tokenizer()
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(model_dir)
    predictions = ["alice buys a car .", "bob sells a dog ."]
    references = [["alice buys a car .", "bob finds a cat ."], ["bob sells the dog today ."]]
    scores, _ = score_text(predictions, references, ScoringSettings(metrics=["bertscore"], bertscore_model=str(model_dir)))
    def f1(preds, refs) -> float:
        return bert_score.score(preds, refs, model_type=str(model_dir), num_layers=2)[2].mean().item()

    # max: bert-score's own multi-reference scoring (each example's best reference)
    assert scores["bertscore_f1"] == scores["bertscore_f1_max"] == pytest.approx(f1(predictions, references))
    assert scores["bertscore_f1_first"] == pytest.approx(f1(predictions, [r[0] for r in references]))
    pooled = [r for refs in references for r in refs]  # mean: each reference its own row
    assert scores["bertscore_f1_mean"] == pytest.approx(f1([predictions[0]] * 2 + [predictions[1]], pooled))
    assert scores["bertscore_f1_max"] > scores["bertscore_f1_mean"]


def test_bertscore_without_its_package_or_model_says_what_to_do(tmp_path, monkeypatch):
    settings = ScoringSettings(metrics=["bertscore"], bertscore_model=str(tmp_path))
    with pytest.raises(ValueError, match="bert-score|not a local model directory"):
        score_text(PREDICTIONS, REFERENCES, settings)
    check_available(list(METRICS))  # everything is installed for the tests (the metrics extra, bert-score in test)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bert_score" else real(name, *a))
    with pytest.raises(ValueError, match="needs bert-score, which is not installed: pip install bert-score"):
        check_available(["rouge", "bertscore"])  # refused before anything is generated, with the fix


def test_eval_writes_every_mode_and_the_held_out_loss(tmp_path, capsys):
    model_dir = tiny.model_dir(tmp_path)
    data = tiny.write_jsonl(tmp_path / "test.jsonl", tiny.dialogue_rows(3, seed=5, references=2))
    out = tmp_path / "eval"
    assert main(["eval", "--model", model_dir, "--data", data, "--output", str(out), "--max-new-tokens", "4",
                 "--metrics", "rouge,token_f1,loss,perplexity", "--reference-mode", "first", "--precision", "fp32",
                 "--max-source-tokens", "48"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference_mode"] == "first" and metrics["metrics"] == ["rouge", "token_f1", "loss", "perplexity"]
    assert metrics["rouge1"] == metrics["rouge1_first"] and {"rouge1_max", "rouge1_mean", "token_f1_mean"} <= set(metrics)
    assert "bleu" not in metrics and "exact_match" not in metrics  # only what was asked for
    # The loss is the model's own: Hugging Face's mean cross-entropy over the reference tokens, averaged by token.
    model, tokenizer = load_model(model_dir)
    _, encoded = load_encoded(data, tokenizer, PromptFormat(max_source_tokens=48), seq2seq=False)
    total = count = 0.0
    with torch.no_grad():
        for item in encoded.items:
            n = item.num_targets
            total += model(input_ids=torch.tensor([item.input_ids]), labels=torch.tensor([item.labels])).loss.item() * n
            count += n
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    row = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert {"rouge1", "token_f1"} <= set(row)
    assert "rouge1" in capsys.readouterr().out
