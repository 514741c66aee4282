"""transformers.Trainer and TRL's SFTTrainer train peftkit models as they train peft models.

Tiny random Llama models; a few optimizer steps each. Saved adapters are checked by loading them in the
real ``peft`` package and in peftkit and comparing logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build

from peftkit import trainers
from peftkit import LoraConfig, PeftModel, get_peft_model

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

ROWS, LENGTH = 8, 12


def token_rows(seed: int = 0) -> dict[str, list]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (ROWS, LENGTH), generator=g)
    return {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}


def tokenizer(directory) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids stay below the tiny models' vocabulary (pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 60)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


def args(out, **kw) -> transformers.TrainingArguments:
    defaults = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, save_steps=2,
                    logging_steps=1, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return transformers.TrainingArguments(**{**defaults, **kw})


def lora_logits(adapter_dir, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``build("llama")`` with the adapter in ``adapter_dir``: loaded by peft, then by peftkit."""
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(build("llama"), str(adapter_dir)).eval()
    ours = PeftModel.from_pretrained(build("llama"), adapter_dir).eval()
    with torch.no_grad():
        return theirs(**batch).logits, ours(**batch).logits


def test_plain_trainer_keeps_the_input_columns_and_trains_with_checkpointing(tmp_path):
    """Default arguments (remove_unused_columns=True) keep the columns the base model's forward takes."""
    model = get_peft_model(build("llama"), LoraConfig(r=4))
    rows = {**token_rows(), "text": ["unused"] * ROWS}
    trainer = transformers.Trainer(model=model, args=args(tmp_path, save_strategy="no", activation_checkpointing=True),
                                   train_dataset=datasets.Dataset.from_dict(rows),
                                   eval_dataset=datasets.Dataset.from_dict({**token_rows(2), "text": ["unused"] * ROWS}))
    assert trainer.label_names == ["labels"]
    assert trainer.evaluate()["eval_loss"] > 0  # labels found: the loss is computed in evaluation too
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before if ".lora_A." in n)  # every LoRA layer got gradients
    assert model.get_base_model().is_activation_checkpointing

    # transformers' own Trainer saves a model it does not take for a peft.PeftModel whole; peftkit cannot change
    # that, but loading the folder as an adapter says what happened and what to do, and the rescue it names works.
    trainer.save_model(tmp_path / "plain")
    assert (tmp_path / "plain" / "model.safetensors").is_file() and not (tmp_path / "plain" / "adapter_config.json").exists()
    with pytest.raises(FileNotFoundError, match=r"whole-model checkpoint.*peftkit\.trainers\.Trainer"):
        PeftModel.from_pretrained(build("llama"), tmp_path / "plain")
    from safetensors.torch import load_file

    rescued = get_peft_model(build("llama"), LoraConfig(r=4))
    rescued.load_state_dict(load_file(tmp_path / "plain" / "model.safetensors"))
    rescued.save_pretrained(tmp_path / "rescued")
    batch = {k: torch.tensor(v[:2]) for k, v in token_rows(1).items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(PeftModel.from_pretrained(build("llama"), tmp_path / "rescued")(**batch).logits, expected)


def test_trainer_checkpoints_are_adapters_that_peft_loads_and_resume_continues(tmp_path):
    batch = {k: torch.tensor(v[:2]) for k, v in token_rows(1).items() if k != "labels"}
    data = datasets.Dataset.from_dict(token_rows())
    torch.manual_seed(0)
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = trainers.Trainer(model=model, args=args(tmp_path / "run"), train_dataset=data)
    trainer.train()
    trainer.save_model(tmp_path / "final")
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4", tmp_path / "final"):
        files = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    theirs, ours = lora_logits(tmp_path / "final", batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ours, rtol=0, atol=0)

    # Resume from step 2 in a fresh trainer: the adapter and optimizer come back, and the last two steps
    # reproduce the uninterrupted run.
    torch.manual_seed(0)
    again = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    resumed = trainers.Trainer(model=again, args=args(tmp_path / "again"), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, ours, rtol=1e-5, atol=1e-5)
    saved = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM"


def test_sft_trainer_trains_a_peftkit_model_and_saves_an_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    tok = tokenizer(tmp_path / "tok")
    text = [" ".join(f"w{(3 + 7 * i + j) % 57 + 3}" for j in range(10)) for i in range(ROWS)]
    data = datasets.Dataset.from_dict({"text": text})
    config = trl.SFTConfig(**{**args(tmp_path / "sft").to_dict(), "max_length": 16, "activation_checkpointing": True,
                              "save_steps": 4, "dataset_text_field": "text"})
    # The documented route for a peftkit config: SFTTrainer from peftkit.trainers takes it as peft_config.
    trainer = trainers.SFTTrainer(model=build("llama"), args=config, train_dataset=data, processing_class=tok,
                                          peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = trainer.model
    assert isinstance(model, PeftModel)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before and ".lora_A." in n)
    assert trainer.state.log_history[0]["loss"] > 0
    checkpoint = tmp_path / "sft" / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    batch = tok(text[:2], return_tensors="pt")
    theirs, ours = lora_logits(checkpoint, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   ours, rtol=0, atol=0)


def test_sft_trainer_refuses_a_peftkit_config_with_a_model_name(tmp_path):
    pytest.importorskip("trl")
    with pytest.raises(TypeError, match="pass the model itself"):
        trainers.SFTTrainer(model="some/model", peft_config=LoraConfig())


def test_load_best_model_at_end_loads_the_best_adapter_checkpoint_back(tmp_path):
    from safetensors.torch import load_file

    data = datasets.Dataset.from_dict(token_rows())
    torch.manual_seed(0)
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # Training on the evaluation rows lowers their loss step by step; "best" = the highest eval loss then picks an
    # early checkpoint, so loading it back is visible (the last step's weights differ from it).
    trainer = trainers.Trainer(model=model, train_dataset=data, eval_dataset=data, args=args(
        tmp_path / "run", save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=True, save_total_limit=None))
    trainer.train()
    losses = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    best_step = max(losses, key=losses.get)
    assert best_step != trainer.state.global_step, losses  # the test must be able to tell best from last
    assert trainer.state.best_model_checkpoint == str(tmp_path / "run" / f"checkpoint-{best_step}")
    state = model._tuner("default").state_dict()
    best = load_file(tmp_path / "run" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    last = load_file(tmp_path / "run" / f"checkpoint-{trainer.state.global_step}" / "adapter_model.safetensors")
    assert state.keys() == best.keys()
    assert all(torch.equal(state[k], best[k]) for k in best)
    assert not all(torch.equal(state[k], last[k]) for k in last)


def test_label_smoothing_scores_next_tokens_as_transformers_does_for_a_causal_lm(tmp_path):
    from transformers.trainer_pt_utils import LabelSmoother

    rows = token_rows(3)
    data = datasets.Dataset.from_dict(rows)
    batch = {k: torch.tensor(v) for k, v in rows.items()}
    torch.manual_seed(0)
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    smoothed = args(tmp_path / "run", label_smoothing_factor=0.1, per_device_eval_batch_size=ROWS, save_strategy="no")
    trainer = trainers.Trainer(model=model, args=smoothed, train_dataset=data, eval_dataset=data)
    model.eval()
    with torch.no_grad():
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        expected = LabelSmoother(epsilon=0.1)(outputs, batch["labels"], shift_labels=True).item()
        plain = model(**batch).loss.item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - plain) > 1e-3  # smoothing changed the loss
    # transformers' own Trainer recognises causal LMs by class name, so it scores a peftkit model unshifted.
    unshifted = transformers.Trainer(model=model, args=smoothed, eval_dataset=data).evaluate()["eval_loss"]
    assert abs(unshifted - expected) > 1e-2
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


def preference_rows() -> dict[str, list[str]]:
    """A tiny preference set (prompt, chosen, rejected) in the word-level tokenizer's vocabulary."""
    words = lambda i, n: " ".join(f"w{3 + (7 * i + j) % 57}" for j in range(n))  # noqa: E731
    return {"prompt": [words(i, 5) for i in range(ROWS)], "chosen": [words(i + 20, 3) for i in range(ROWS)],
            "rejected": [words(i + 40, 4) for i in range(ROWS)]}


def dpo_config(out, **kw):
    trl = pytest.importorskip("trl")
    return trl.DPOConfig(**{**args(out).to_dict(), "max_length": 16, "beta": 0.1, "save_steps": 4, **kw})


def test_dpo_trainer_with_a_peftkit_config_trains_against_the_base_model_and_saves_an_adapter(tmp_path):
    from trl.trainer.utils import add_fused_lm_head

    tok = tokenizer(tmp_path / "tok")
    data = datasets.Dataset.from_dict(preference_rows())
    trainer = trainers.DPOTrainer(model=build("llama"), args=dpo_config(tmp_path / "dpo", activation_checkpointing=True),
                                  train_dataset=data, processing_class=tok,
                                  peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = trainer.model
    assert isinstance(model, PeftModel) and isinstance(trainer.ref_model, trainers.AdapterOffReference)
    trainer.train()
    assert model.get_base_model().is_activation_checkpointing
    # Step 1: the fresh adapter is a no-op, so policy == reference and the DPO loss is -log sigmoid(0) = log 2.
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert trainer.state.log_history[-2]["loss"] < 0.69  # it learned to prefer the chosen answers

    # The reference is the base model: its log-probabilities equal those of a fresh copy of the base model, and
    # differ from the trained policy's.
    batch = next(iter(trainer.get_train_dataloader()))
    base = build("llama").eval()
    add_fused_lm_head(base)
    model.eval()
    reference = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    expected = trainer.compute_ref_log_probs(base, batch)
    policy = trainer.compute_ref_log_probs(model, batch)
    for ours, theirs, trained in zip(reference, expected, policy):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours, trained, atol=1e-3)

    checkpoint = tmp_path / "dpo" / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    ids = tok(preference_rows()["prompt"][:2], return_tensors="pt")
    batch = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    theirs, ours = lora_logits(checkpoint, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ours, rtol=0, atol=0)


def test_dpo_trainer_with_a_pretrained_peftkit_adapter_uses_a_frozen_copy_as_reference(tmp_path):
    tok = tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    start = {k: v.clone() for k, v in model._tuner("default").state_dict().items()}
    trainer = trainers.DPOTrainer(model=model, args=dpo_config(tmp_path / "dpo", max_steps=2, save_strategy="no"),
                                  train_dataset=datasets.Dataset.from_dict(preference_rows()), processing_class=tok)
    assert "ref" in model.peft_config and model.active_adapter == "default"
    trainer.train()
    # The reference is the adapter as it came (TRL's rule for a peft model with an adapter), not the bare base model:
    # at step 1 policy == reference, so the loss is log 2 although the adapter is far from a no-op.
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    ref = model._tuner("ref").state_dict()
    assert all(torch.equal(ref[k], start[k]) for k in start)  # the reference stayed frozen
    assert not all(torch.equal(v, start[k]) for k, v in model._tuner("default").state_dict().items())


def test_dpo_trainer_refuses_lm_head_in_the_targets_and_leaves_the_model_as_it_came(tmp_path):
    from peftkit.inject import AdapterHost

    base = build("llama")
    with pytest.raises(ValueError, match="lm_head"):
        trainers.DPOTrainer(model=base, args=dpo_config(tmp_path / "dpo"), processing_class=tokenizer(tmp_path),
                            train_dataset=datasets.Dataset.from_dict(preference_rows()),
                            peft_config=LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert not any(isinstance(m, AdapterHost) for m in base.modules())
