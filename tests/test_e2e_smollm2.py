"""End to end on the real model and real data: `peftkit train` on DialogSum rows with SmolLM2-135M-Instruct
lowers the loss, the adapter loads in the reference `peft` package with identical outputs, and
`peftkit eval` writes sane ROUGE. A few minutes on 2 CPU cores (the first run also converts the model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit.cli import main

REPO = Path(__file__).resolve().parents[1]
# <repo>/../shared/data/dialogsum; a git worktree one level deeper finds it one more level up.
CANDIDATES = [REPO.parent / "shared" / "data" / "dialogsum", REPO.parent.parent / "shared" / "data" / "dialogsum"]
DIALOGSUM = next((p for p in CANDIDATES if (p / "dev.jsonl").is_file()), None)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(DIALOGSUM is None, reason=f"DialogSum not found in {[str(p) for p in CANDIDATES]}"),
]


def test_train_then_peft_loads_the_adapter_then_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "lora"
    # 8 dialogues, 6 steps of 4 (3 epochs), held-out loss measured on the same rows before and after.
    common = ["--data", str(DIALOGSUM / "dev.jsonl"), "--limit", "8", "--max-source-tokens", "320"]
    assert main(["train", *common, "--output", str(out), "--method", "lora", "--max-steps", "6", "--batch-size", "4",
                 "--lr", "2e-3", "--eval-data", str(DIALOGSUM / "dev.jsonl"), "--eval-limit", "8", "--log-every", "1"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["eval_loss"] < run["eval_loss_before"] - 0.1, run
    # r=8 on every linear layer of 30 layers (the lora default): q/o 576x576, k/v 576->192, gate/up 576->1536, down 1536->576
    assert run["trainable_params"] == 30 * 8 * (2 * 1152 + 2 * 768 + 3 * 2112) == 2_442_240 and run["total_params"] > 134_000_000
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == list(range(0, 7)) and all(line.get("tokens_per_s", 1) > 0 for line in log)
    print(f"\nSmolLM2 e2e: held-out loss {run['eval_loss_before']:.4f} -> {run['eval_loss']:.4f} ({run['precision']}, "
          f"{run['train_tokens_per_s']:.0f} tokens/s)")

    # The adapter is a Hugging Face PEFT adapter: the reference package loads it and computes the same outputs.
    from peft import PeftModel as ReferencePeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit import PeftModel
    from peftkit.hub import ensure_cached

    base_dir = ensure_cached("smollm2-135m-instruct")
    # The adapter names its base model by the Hugging Face id (peft loads that; peftkit maps it to its copy).
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("#Person1#: Hello, how are you?\n#Person2#: Fine, thanks. Summary:", return_tensors="pt")
    reference = ReferencePeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    with torch.no_grad():
        expected, got = reference(**ids).logits, ours(**ids).logits
        with ours.disable_adapter():
            base = ours(**ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert (got - base).abs().max() > 1e-3  # the trained adapter changes the model
    del reference, ours

    # `peftkit eval`: batched generation and ROUGE against the three references of the test split.
    assert main(["eval", "--adapter", str(out), "--data", str(DIALOGSUM / "test.jsonl"), "--limit", "8",
                 "--max-new-tokens", "48", "--batch-size", "8", "--output", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 8 and metrics["references_per_example"] == 3
    assert 0.1 < metrics["rouge1"] < 1 and 0 < metrics["rouge2"] < metrics["rouge1"] and 0 < metrics["rougeL"] <= metrics["rougeLsum"] + 0.05
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and all(p["prediction"] for p in predictions)
    print(f"SmolLM2 e2e: ROUGE-1 {metrics['rouge1']:.4f} ROUGE-2 {metrics['rouge2']:.4f} ROUGE-L {metrics['rougeL']:.4f} "
          f"ROUGE-Lsum {metrics['rougeLsum']:.4f} on {metrics['n']} test rows ({metrics['examples_per_s']:.2f} examples/s)")
