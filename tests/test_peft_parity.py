"""Parity with the reference ``peft`` package: files move both ways and give the same outputs.

``peft`` is a test-only dependency; peftkit never imports it.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import ARCHS, build, inputs, output
from safetensors.torch import load_file

from peftkit import LoraConfig, PeftModel, get_peft_model

VARIANTS = {
    "default": dict(r=4, lora_alpha=8),
    "rslora_patterns": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v": 2, "v_proj": 2, "value": 2}, alpha_pattern={"q": 3, "q_proj": 3, "query": 3}),
    "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
}


def _peft_targets(arch, kwargs):
    # peft has no BERT default for plain BertModel; give the same list peftkit defaults to.
    if arch == "bert" and "target_modules" not in kwargs:
        return {**kwargs, "target_modules": ["query", "value"]}
    return kwargs


def _randomize(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_peftkit_adapter_loads_in_peft_with_equal_outputs(arch, variant, tmp_path):
    model = get_peft_model(build(arch), LoraConfig(**VARIANTS[variant]))
    _randomize(model)
    batch = inputs(arch)
    ours = output(model, batch)
    model.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(build(arch), tmp_path)
    torch.testing.assert_close(output(reference, batch), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_adapter_loads_in_peftkit_with_equal_outputs(arch, variant, tmp_path):
    reference = peft.get_peft_model(build(arch), peft.LoraConfig(**_peft_targets(arch, VARIANTS[variant])))
    _randomize(reference)
    batch = inputs(arch)
    theirs = output(reference, batch)
    reference.save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(build(arch), tmp_path)
    torch.testing.assert_close(output(model, batch), theirs, rtol=1e-5, atol=1e-5)


def test_files_have_the_same_keys_shapes_and_config_fields_as_peft(tmp_path):
    ours = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    theirs.save_pretrained(tmp_path / "theirs")
    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    ca = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for field in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "fan_in_fan_out", "inference_mode"):
        assert ca[field] == cb[field], field
    assert sorted(ca["target_modules"]) == sorted(cb["target_modules"])
    assert set(ca) <= set(cb), f"fields peft does not know: {set(ca) - set(cb)}"


def test_named_adapters_in_subfolders_load_in_peft(tmp_path):
    model = get_peft_model(build("llama"), LoraConfig(r=4))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"]))
    _randomize(model)
    batch = inputs("llama")
    model.set_adapter("second")
    want = output(model, batch)
    model.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(build("llama"), tmp_path)
    reference.load_adapter(tmp_path / "second", adapter_name="second")
    reference.set_adapter("second")
    torch.testing.assert_close(output(reference, batch), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [dict(target_modules=["embed_tokens", "q_proj"]), dict(modules_to_save=["lm_head"])])
def test_embeddings_and_modules_to_save_move_both_ways(extra, tmp_path):
    batch = inputs("llama")
    model = get_peft_model(build("llama"), LoraConfig(r=4, **extra))
    _randomize(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".module." in n:  # the modules_to_save copy
                p.add_(0.05)
    ours = output(model, batch)
    model.save_pretrained(tmp_path / "ours")
    reference = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours")
    torch.testing.assert_close(output(reference, batch), ours, rtol=1e-5, atol=1e-5)

    reference = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, **extra))
    _randomize(reference)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.05)
    theirs = output(reference, batch)
    reference.save_pretrained(tmp_path / "theirs")
    model = PeftModel.from_pretrained(build("llama"), tmp_path / "theirs")
    torch.testing.assert_close(output(model, batch), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_same_weights_give_the_same_loss_and_gradients_as_peft(arch):
    batch = inputs(arch)
    ours = get_peft_model(build(arch), LoraConfig(r=4, lora_alpha=8))
    theirs = peft.get_peft_model(build(arch), peft.LoraConfig(r=4, lora_alpha=8))
    _randomize(ours)
    _randomize(theirs)
    ours.train(), theirs.train()
    ours(**batch).loss.backward()
    theirs(**batch).loss.backward()
    grads_ours = [p.grad for n, p in ours.named_parameters() if p.requires_grad]
    grads_theirs = [p.grad for n, p in theirs.named_parameters() if p.requires_grad]
    assert len(grads_ours) == len(grads_theirs) > 0
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
