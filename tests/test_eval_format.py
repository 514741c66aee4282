"""`peftkit eval --adapter` evaluates with the prompt format the adapter was trained with."""

from __future__ import annotations

import json

import pytest

import peftkit.evaluate as evaluate_module
import tiny_pipeline as tiny
from conftest import build
from peftkit.cli import main
from peftkit.train import loop as loop_module
from test_data_layouts import CHATS, chat_tokenizer

FIELDS_FLAGS = ["--input-field", "question", "--target-field", "answer", "--template", "question : {input} answer :",
                "--no-chat-template", "--max-source-tokens", "16", "--truncation-side", "left"]


def _qa_rows(n):
    return [{"question": r["dialogue"], "answer": r["summary"]} for r in tiny.dialogue_rows(n, seed=4)]


@pytest.fixture
def capture(monkeypatch):
    """The prompts training encoded, and the prompts evaluation generated from."""
    seen = {"train": [], "eval": []}
    encode, generate = loop_module.encode_examples, evaluate_module.generate_predictions

    def encode_spy(*args, **kwargs):
        out = encode(*args, **kwargs)
        seen["train"] += [e.prompt_ids for e in out.items]
        return out

    def generate_spy(model, tokenizer, items, *args, **kwargs):
        seen["eval"] += [e.prompt_ids for e in items]
        return generate(model, tokenizer, items, *args, **kwargs)

    monkeypatch.setattr(loop_module, "encode_examples", encode_spy)
    monkeypatch.setattr(evaluate_module, "generate_predictions", generate_spy)
    return seen


@pytest.mark.parametrize("layout", ["fields", "messages"])
def test_eval_reproduces_the_training_prompt_without_flags(tmp_path, capture, layout):
    if layout == "fields":
        model = tiny.model_dir(tmp_path, "llama", chat_template=True)  # has a chat template; training switched it off
        data, flags = tiny.write_jsonl(tmp_path / "qa.jsonl", _qa_rows(6)), FIELDS_FLAGS
    else:
        model = tmp_path / "tiny-chat"
        build("llama").save_pretrained(model)
        chat_tokenizer().save_pretrained(model)
        data, flags = tiny.write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS * 2]), ["--assistant-turns", "last"]
    adapter, out = tmp_path / "adapter", tmp_path / "eval"
    assert main(["train", "--model", str(model), "--data", data, "--output", str(adapter), "--max-steps", "1",
                 "--batch-size", "2", "--precision", "fp32", *flags]) == 0
    assert main(["eval", "--adapter", str(adapter), "--data", data, "--output", str(out), "--max-new-tokens", "2",
                 "--precision", "fp32"]) == 0
    assert capture["eval"] and sorted(capture["eval"]) == sorted(capture["train"])  # the same prompt tokens, row for row
    run, metrics = (json.loads((p / name).read_text()) for p, name in ((adapter, "run.json"), (out, "metrics.json")))
    assert metrics["format"] == run["format"] and metrics["format_source"] == str(adapter / "run.json")
    assert run["format"]["layout"] == layout
    if layout == "fields":
        assert run["format"]["template"] == "question : {input} answer :" and run["format"]["chat_template_used"] is False
        assert run["truncated_inputs"] > 0  # truncation (from the left) mattered, and was reproduced
    else:
        assert run["format"]["assistant_turns"] == "last" and run["format"]["chat_template_used"] is True


def test_a_different_prompt_needs_the_override_flag(tmp_path, capsys):
    model = tiny.model_dir(tmp_path, "llama")
    data = tiny.write_jsonl(tmp_path / "qa.jsonl", _qa_rows(4))
    adapter = tmp_path / "adapter"
    assert main(["train", "--model", model, "--data", data, "--output", str(adapter), "--max-steps", "1", "--precision", "fp32",
                 *FIELDS_FLAGS]) == 0
    capsys.readouterr()
    other = ["--template", "answer : {input}"]
    common = ["eval", "--adapter", str(adapter), "--data", data, "--max-new-tokens", "2", "--precision", "fp32"]
    assert main([*common, "--output", str(tmp_path / "e1"), *other]) == 2
    err = capsys.readouterr().err
    assert "template='answer : {input}' (trained with 'question : {input} answer :')" in err
    assert "--override-training-format" in err and not (tmp_path / "e1").exists()
    # repeating the training value is no conflict; an explicit override is recorded
    assert main([*common, "--output", str(tmp_path / "e2"), "--truncation-side", "left"]) == 0
    assert main([*common, "--output", str(tmp_path / "e3"), *other, "--override-training-format"]) == 0
    metrics = json.loads((tmp_path / "e3" / "metrics.json").read_text())
    assert metrics["format"]["template"] == "answer : {input}" and metrics["format"]["input_field"] == "question"
    assert metrics["format_source"].endswith("run.json with the settings given")


def test_without_a_training_run_the_given_settings_and_defaults_apply(tmp_path):
    model = tiny.model_dir(tmp_path, "llama")
    data = tiny.write_jsonl(tmp_path / "qa.jsonl", _qa_rows(2))
    out = tmp_path / "e"
    assert main(["eval", "--model", model, "--data", data, "--output", str(out), "--max-new-tokens", "2",
                 "--input-field", "question", "--target-field", "answer"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["format_source"] == "defaults and the settings given" and metrics["format"]["input_field"] == "question"
