"""Generation, ROUGE, `peftkit eval` and `peftkit merge` on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny_pipeline as tiny
from conftest import build
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.cli import main
from peftkit.data import PromptFormat, encode_examples, read_examples
from peftkit.evaluate import GenerationSettings, generate_predictions, rouge, rouge_per_example, sentences_on_lines
from peftkit.hub import load_model

FORMAT = PromptFormat(max_source_tokens=48)


# --- ROUGE -------------------------------------------------------------------------------------------
def test_rouge_basics():
    assert rouge(["the cat sat on the mat ."], [["the cat sat on the mat ."]]) == {
        "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0, "n": 1,
    }
    zero = rouge(["dogs bark"], [["the cat sat"]])
    assert zero["rouge1"] == 0.0 and zero["n"] == 1
    # Stemming: "running" and "runs" share the stem "run".
    assert rouge(["he runs"], [["he running"]])["rouge1"] == 1.0
    half = rouge(["a b c d"], [["a b x y"]])
    assert half["rouge1"] == pytest.approx(0.5) and half["rouge2"] == pytest.approx(1 / 3)


def test_several_references_take_the_best_per_example():
    prediction = ["tom buys a red car today"]
    best = rouge_per_example(prediction, [["mary sells flowers", "tom buys a red car today"]])[0]
    assert best["rouge1"] == 1.0
    only_first = rouge_per_example(prediction, [["mary sells flowers"]])[0]
    assert only_first["rouge1"] < best["rouge1"]


def test_rouge_lsum_sees_sentences():
    assert sentences_on_lines("Tom is ill. He stays home! Why? Because.") == "Tom is ill.\nHe stays home!\nWhy?\nBecause."
    # Two sentences in the reverse order: ROUGE-L (one sequence) drops, ROUGE-Lsum (per sentence) does not.
    scores = rouge(["he stays home. tom is ill."], [["tom is ill. he stays home."]])
    assert scores["rougeLsum"] == pytest.approx(1.0) and scores["rougeL"] < 0.8


# --- generation -------------------------------------------------------------------------------------------
def _items(tmp_path, tok, seq2seq=False, n=6):
    examples = read_examples(tiny.write_jsonl(tmp_path / "e.jsonl", tiny.dialogue_rows(n, seed=3)))
    return encode_examples(examples, tok, FORMAT, seq2seq, with_target=False).items


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_batched_generation_equals_one_example_at_a_time(arch, tmp_path):
    seq2seq = arch == "t5"
    tok = tiny.tokenizer(seq2seq=seq2seq)
    model = get_peft_model(build(arch), LoraConfig(r=4, init_lora_weights=False)).eval()
    items = _items(tmp_path, tok, seq2seq)
    assert len({e.prompt_length for e in items}) > 1  # different lengths: padding is exercised
    settings = GenerationSettings(max_new_tokens=6, batch_size=4)
    batched = generate_predictions(model, tok, items, settings, seq2seq, progress=False)
    one_by_one = []
    for e in items:
        ids = torch.tensor([e.prompt_ids])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        one_by_one.append(tok.decode(out[0] if seq2seq else out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert batched == one_by_one
    assert any(batched)


def test_beam_search_runs_and_predictions_keep_their_order(tmp_path):
    tok = tiny.tokenizer()
    model = build("llama").eval()
    items = _items(tmp_path, tok)
    beams = generate_predictions(model, tok, items, GenerationSettings(max_new_tokens=4, num_beams=3, batch_size=2), False, progress=False)
    single = [generate_predictions(model, tok, [e], GenerationSettings(max_new_tokens=4, num_beams=3), False, progress=False)[0] for e in items]
    assert beams == single


# --- peftkit eval / merge ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = tiny.model_dir(root, "llama")
    data = tiny.write_jsonl(root / "train.jsonl", tiny.dialogue_rows(16))
    test = tiny.write_jsonl(root / "test.jsonl", tiny.dialogue_rows(6, seed=5, references=3))
    assert main(["train", "--model", model_dir, "--data", data, "--output", str(root / "adapter"), "--max-steps", "3",
                 "--max-source-tokens", "48", "--precision", "fp32", "--lr", "1e-2"]) == 0
    return root, model_dir, test


def test_eval_writes_metrics_and_predictions(trained, capsys):
    root, _, test = trained
    out = root / "eval"
    # --model is not given: the adapter names its base model in adapter_config.json
    assert main(["eval", "--adapter", str(root / "adapter"), "--data", test, "--output", str(out), "--max-new-tokens", "5",
                 "--max-source-tokens", "48", "--batch-size", "4", "--limit", "5"]) == 0
    assert "n=5" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 5 and metrics["references_per_example"] == 3
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["row"] for line in lines] == [1, 2, 3, 4, 5] and all(len(line["references"]) == 3 for line in lines)
    recomputed = rouge([line["prediction"] for line in lines], [line["references"] for line in lines])
    assert recomputed["rouge1"] == pytest.approx(metrics["rouge1"])


def test_eval_errors_are_one_line(trained, tmp_path, capsys):
    root, model_dir, test = trained
    assert main(["eval", "--adapter", str(tmp_path), "--data", test, "--output", str(tmp_path / "o")]) == 2
    assert "is not an adapter directory" in capsys.readouterr().err
    assert main(["eval", "--adapter", model_dir, "--data", test, "--output", str(tmp_path / "o")]) == 2
    assert f"pass it as --model {model_dir}" in capsys.readouterr().err


def test_merge_writes_a_plain_model_with_the_adapters_outputs(trained):
    root, model_dir, _ = trained
    out = root / "merged"
    assert main(["merge", "--model", model_dir, "--adapter", str(root / "adapter"), "--output", str(out)]) == 0
    merged, tok = load_model(str(out))
    base, _ = load_model(model_dir)
    with_adapter = PeftModel.from_pretrained(base, root / "adapter").eval()
    ids = torch.tensor([tok("# person1 # : alice buys a book today ? summary :")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits, atol=1e-5)
    sizes = {k: v.shape for k, v in load_file(str(out / "model.safetensors")).items()}
    assert sizes == {k: v.shape for k, v in load_file(model_dir + "/model.safetensors").items()}  # same size as the base


def test_bf16_generation_stays_close_to_fp32(tmp_path):
    """The fast path of `peftkit eval` (precision auto -> autocast over bf16 linear weights): the same
    arithmetic as plain autocast, and next-token log-probabilities within 0.05 of fp32 (tiny model)."""
    from peftkit.precision import autocast, cast_linear_weights_to_bf16

    tok = tiny.tokenizer()
    model = get_peft_model(build("llama"), LoraConfig(r=4, init_lora_weights=False)).eval()
    ids = torch.tensor([_items(tmp_path, tok)[0].prompt_ids])
    cpu = torch.device("cpu")
    with torch.no_grad():
        fp32 = torch.log_softmax(model(input_ids=ids).logits, -1)
        with autocast(cpu, True):
            plain_autocast = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
            cast_linear_weights_to_bf16(model)
            fast = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    assert model.base_model.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.base_model.model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.allclose(fast, plain_autocast, atol=1e-5)
    assert (fp32 - fast).abs().max() < 0.05 and not torch.equal(fp32, fast)


def test_generation_with_a_soft_prompt_that_passes_embeddings(tmp_path):
    """A soft prompt that reaches `generate` as embeddings only: PeftModel.generate still returns the prompt
    before the new tokens, as for any causal LM, so predictions are the new tokens alone."""
    tok = tiny.tokenizer()
    items = _items(tmp_path, tok)
    with tiny.soft_prompt_method() as SoftPromptConfig:
        model = get_peft_model(build("llama"), SoftPromptConfig()).eval()
        batched = generate_predictions(model, tok, items, GenerationSettings(max_new_tokens=5, batch_size=4), False, progress=False)
        single = []
        for e in items:
            ids = torch.tensor([e.prompt_ids])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            assert torch.equal(out[:, :ids.shape[1]], ids) and out.shape[1] <= ids.shape[1] + 5
            single.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert batched == single and any(batched)


def test_eval_and_merge_help_explain_their_options(capsys):
    for command, flags in (("eval", ["--adapter", "--data", "--limit", "--max-new-tokens", "--num-beams", "--batch-size",
                                     "--precision", "--output", "--template", "--config", "--set"]),
                           ("merge", ["--model", "--adapter", "--output"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert all(flag in text for flag in flags), command
    assert "default" in text


def test_the_command_line_does_not_import_the_rouge_scorer_until_it_scores():
    """rouge_score imports NLTK, SciPy and scikit-learn (2.3 s here): every command's parser, `peftkit --help` and
    `peftkit train` start without it; scoring imports it."""
    script = ("import sys; from peftkit.cli import build_parser; build_parser(); print('nltk' in sys.modules); "
              "from peftkit.evaluate.rouge import rouge; rouge(['a b'], [['a b']]); print('nltk' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]


def test_eval_of_an_encoder_decoder_model_without_adapter(tmp_path):
    model_dir = tiny.model_dir(tmp_path, "t5")
    data = tiny.write_jsonl(tmp_path / "d.jsonl", tiny.dialogue_rows(5, seed=2))
    assert main(["eval", "--model", model_dir, "--data", data, "--output", str(tmp_path / "out"), "--max-new-tokens", "4",
                 "--precision", "fp32"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n"] == 5 and metrics["adapter"] is None and metrics["precision"] == "fp32"
