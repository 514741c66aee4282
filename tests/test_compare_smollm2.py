"""End to end on the real model: `peftkit compare` with SmolLM2-135M-Instruct on the shipped demo data, a
very small budget (a couple of LoRA steps, a few rows), each entry in its own process as in real use.
About a minute on 2 CPU cores once the model is converted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.cli import main
from peftkit.experiments import REPORT_FIELDS

DEMO = Path(__file__).resolve().parents[1] / "src" / "peftkit" / "data" / "demo"

pytestmark = pytest.mark.slow


def test_compare_baseline_and_lora_on_smollm2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "cmp"
    code = main(["compare", "--train-data", str(DEMO / "demo_train.jsonl"), "--eval-data", str(DEMO / "demo_eval.jsonl"),
                 "--methods", "baseline,lora", "--per-method", "lora.lr=1e-3,lora.target_modules=q_proj,v_proj", "--max-steps", "2", "--batch-size", "2",
                 "--eval-limit", "3", "--max-new-tokens", "12", "--latency-rows", "1", "--example-rows", "1",
                 "--threads", "1", "--general-texts", "3", "--topic-rows", "5", "--output", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    baseline, lora = report["methods"]
    assert (baseline["name"], lora["name"]) == ("baseline", "lora") and baseline["status"] == lora["status"] == "ok"
    assert set(REPORT_FIELDS) == set(lora)
    # SmolLM2-135M: 30 layers, LoRA r=8 on q_proj (576 -> 576) and v_proj (576 -> 192).
    assert lora["trainable_params"] == 30 * 8 * ((576 + 576) + (576 + 192)) == 460_800
    assert lora["total_params"] == baseline["total_params"] + lora["trainable_params"] and baseline["total_params"] > 134_000_000
    assert lora["trainable_percent"] == pytest.approx(100 * 460_800 / lora["total_params"])
    assert lora["lr"] == 1e-3 and lora["train_steps"] == 2 and lora["train_examples_seen"] == 4
    assert 1_000_000 < lora["stored_bytes"] < 3_000_000  # 460,800 fp32 parameters plus the config
    for m in (baseline, lora):
        assert m["eval_examples"] == 3 and 0 < m["rouge1"] < 1 and m["latency_s_per_example"] > 0
        assert m["rougeL_delta"] == pytest.approx(m["rougeL"] - baseline["rougeL"])
    assert lora["latency_merged_s_per_example"] > 0 and lora["peak_train_memory_mb"] > 500  # the model alone is 540 MB
    # Forgetting: the base model's loss on news text is a language model's (a few nats per token), the
    # baseline is the base model itself, and 2 steps of LoRA barely move it.
    assert 1.5 < baseline["general_loss_base"] < 6 and baseline["forgetting"] == 0.0
    assert lora["general_loss_base"] == baseline["general_loss_base"] and abs(lora["forgetting"]) < 0.5
    assert 0 <= lora["topic_accuracy"] <= 1 and lora["topic_accuracy_delta"] == lora["topic_accuracy"] - baseline["topic_accuracy"]
    assert report["plots"] == ["quality_vs_params.png", "costs.png", "gain_vs_forgetting.png"] and all((out / p).stat().st_size > 10_000 for p in report["plots"])
    printed = capsys.readouterr().out
    assert "| lora | 0.001 |" in printed and str(out / "report.md") in printed
