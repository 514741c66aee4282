"""AdaLoRA: file parity with ``peft`` both ways (allocated ranks included), the rank allocation itself against
``peft``'s on the same weights and gradients, and training through peftkit's loop."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import tiny_pipeline as tiny
from conftest import build, inputs, output
from parity import load_in_peft, max_abs_diff, saved_shapes
from peftkit import PeftModel, get_peft_model
from peftkit.methods.adalora import AdaLoraConfig
from peftkit.train import TrainConfig, train

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "t5": ["q", "v"]}
STEPS = 8


def _schedule(**kw) -> dict:
    return dict(init_r=6, target_r=2, tinit=1, tfinal=2, lora_alpha=8, **kw)


def _train(model, step_hook, arch: str, steps: int = STEPS, penalty=None) -> None:
    """A few AdamW steps on fixed random tokens; ``step_hook(step)`` runs after each optimizer step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    batch = inputs(arch, batch=2, length=8)
    model.train()
    for step in range(1, steps + 1):
        loss = model(**batch).loss
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        optimizer.step()
        step_hook(step)
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_peft_allocated_adapter_loads_in_peftkit_with_equal_outputs(arch, tmp_path):
    theirs = peft.get_peft_model(build(arch), peft.AdaLoraConfig(total_step=STEPS, target_modules=TARGETS[arch], **_schedule()))
    _train(theirs, theirs.base_model.update_and_allocate, arch)
    theirs.save_pretrained(tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    kept = {k: sum(v) for k, v in pattern.items()}
    assert sum(kept.values()) == 2 * len(kept) and len(set(kept.values())) > 1  # ranks moved between layers

    ours = PeftModel.from_pretrained(build(arch), str(tmp_path))
    batch = inputs(arch)
    torch.testing.assert_close(output(ours, batch), output(theirs, batch), rtol=1e-5, atol=1e-6)
    ours.save_pretrained(tmp_path / "again")  # and back: the same file
    assert saved_shapes(tmp_path / "again") == saved_shapes(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peftkit_allocation_matches_peft_and_its_file_loads_in_peft(arch, tmp_path):
    # task_type: only peft's task models add AdaLoRA's orthogonality penalty to the loss in forward().
    theirs = peft.get_peft_model(build(arch), peft.AdaLoraConfig(total_step=STEPS, target_modules=TARGETS[arch], task_type="CAUSAL_LM",
                                                                  init_lora_weights=False, **_schedule()))
    ours = get_peft_model(build(arch), AdaLoraConfig(target_modules=TARGETS[arch], init_lora_weights=False, **_schedule()))
    tuner = ours.tuner()
    state = {k.removeprefix("base_model.model.").replace(".default", ""): v for k, v in theirs.state_dict().items()}
    with torch.no_grad():  # the same starting values in both
        for path, layer in tuner.layers():
            for name in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, name).copy_(state[f"{path}.{name}"])
    _train(theirs, theirs.base_model.update_and_allocate, arch)
    _train(ours, lambda step: tuner.update_and_allocate(step, STEPS), arch, penalty=tuner.orthogonal_regularization)

    their_pattern = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert ours.peft_config["default"].rank_pattern == their_pattern
    batch = inputs(arch)
    torch.testing.assert_close(output(ours, batch), output(theirs, batch), rtol=1e-4, atol=1e-5)

    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == STEPS
    loaded = load_in_peft(arch, tmp_path)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}  # peft's AdaLoRA without a task_type needs no loss
    assert max_abs_diff(output(loaded, unlabelled), output(ours, unlabelled)) < 1e-5
    assert sum(s[0] for k, s in saved_shapes(tmp_path).items() if k.endswith("lora_E")) == 2 * len(tuner.layers())


def test_training_through_peftkit_allocates_the_budget(tmp_path):
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.dialogue_rows(16))
    out = tmp_path / "run"
    train(TrainConfig(model=tiny.model_dir(tmp_path, "llama"), data=data, output=str(out), method="adalora", max_steps=6,
                      batch_size=4, lr=1e-2, log_every=2, precision="fp32"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["total_step"] == 6 and (config["target_r"], config["init_r"]) == (8, 12)
    kept = [sum(v) for v in config["rank_pattern"].values()]
    assert sum(kept) == 8 * len(kept) == 8 * 4  # q_proj and v_proj in 2 layers
    shapes = saved_shapes(out)
    assert all(shapes[f"base_model.model.{k}"][0] == sum(v) for k, v in config["rank_pattern"].items())
    # What was saved computes what peft computes with it.
    ours = PeftModel.from_pretrained(build("llama"), str(out))
    batch = {k: v for k, v in inputs("llama").items() if k != "labels"}
    assert max_abs_diff(output(ours, batch), output(load_in_peft("llama", out), batch)) < 1e-5


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="must not exceed init_r"):
        AdaLoraConfig(target_r=16, init_r=8)
    with pytest.raises(ValueError, match="leave no step"):
        AdaLoraConfig(total_step=10, tinit=6, tfinal=4)
    with pytest.raises(ValueError, match="bias must be 'none'"):
        AdaLoraConfig(bias="all")
    with pytest.raises(ValueError, match="list of 12 booleans"):
        AdaLoraConfig(rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True]})
    model = build("llama")
    with pytest.raises(ValueError, match="has no entry for"):
        get_peft_model(model, AdaLoraConfig(target_modules=["q_proj"], rank_pattern={"x.lora_E": [True] * 12}))
