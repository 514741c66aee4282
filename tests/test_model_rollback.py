"""A failed get_peft_model / from_pretrained / load_adapter / add_adapter leaves the model exactly as it
was found: every parameter and buffer bit for bit, every ``requires_grad``, every module and its
training flag, and (for a PeftModel) its adapters and which one is active."""

from __future__ import annotations

import pytest
import torch
from conftest import build
from serve_utils import model_state
from safetensors.torch import load_file, save_file

from peftkit import FullConfig, LoraConfig, PeftModel, get_peft_model
from peftkit.io.files import WEIGHTS_NAME


def gpt2_found_as_users_have_it() -> torch.nn.Module:
    """GPT-2 (Conv1D layers with biases) in training mode, with one submodule in eval mode and one
    parameter frozen, so that "as it was found" is not simply "all trainable, all in train mode"."""
    model = build("gpt2")
    model.train()
    model.transformer.drop.eval()
    model.transformer.wpe.weight.requires_grad_(False)
    return model


def saved(tmp_path, name: str, config, mutate=None):
    """An adapter trained on a fresh GPT-2, saved; ``mutate(tensors)`` then edits its file."""
    peft_model = get_peft_model(build("gpt2", seed=3), config)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    peft_model.save_pretrained(tmp_path / name)
    if mutate is not None:
        path = tmp_path / name / WEIGHTS_NAME
        tensors = load_file(path)
        mutate(tensors)
        save_file(tensors, path)
    return tmp_path / name


def wrong_shape(tensors: dict) -> None:
    key = sorted(k for k in tensors if "lora_B" in k or k.endswith(".bias"))[-1]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])


def drop_one(tensors: dict) -> None:
    del tensors[sorted(tensors)[0]]


def test_get_peft_model_that_matches_no_target_leaves_the_model_as_found():
    model = gpt2_found_as_users_have_it()
    before = model_state(model)
    with pytest.raises(ValueError):
        get_peft_model(model, LoraConfig(target_modules=["no_such_module"]))
    assert model_state(model) == before


@pytest.mark.parametrize("kind", ["lora wrong shape", "lora missing tensor", "bias=all wrong bias shape",
                                  "full missing tensor", "corrupt file"])
def test_from_pretrained_that_fails_leaves_the_model_as_found(tmp_path, kind):
    config = {"lora wrong shape": LoraConfig(target_modules=["c_attn"]), "lora missing tensor": LoraConfig(target_modules=["c_attn"]),
              "bias=all wrong bias shape": LoraConfig(target_modules=["c_attn"], bias="all"),
              "full missing tensor": FullConfig(), "corrupt file": LoraConfig(target_modules=["c_attn"])}[kind]
    mutate = drop_one if "missing" in kind else wrong_shape
    path = saved(tmp_path, "adapter", config, None if kind == "corrupt file" else mutate)
    if kind == "corrupt file":
        (path / WEIGHTS_NAME).write_bytes((path / WEIGHTS_NAME).read_bytes()[:100])
    model = gpt2_found_as_users_have_it()
    before = model_state(model)
    with pytest.raises((ValueError, KeyError)):
        PeftModel.from_pretrained(model, path)
    assert model_state(model) == before


def test_load_adapter_and_add_adapter_that_fail_leave_the_peft_model_as_found(tmp_path):
    peft_model = get_peft_model(gpt2_found_as_users_have_it(), LoraConfig(target_modules=["c_attn"]))
    peft_model.add_adapter("other", LoraConfig(target_modules=["c_proj"]))
    peft_model.transformer.h[0].attn.attn_dropout.eval()
    before = model_state(peft_model), peft_model.active_adapter, list(peft_model.peft_config)
    for path in (saved(tmp_path, "bad-shape", LoraConfig(target_modules=["c_fc"]), wrong_shape),
                 saved(tmp_path, "missing", LoraConfig(target_modules=["c_fc"]), drop_one)):
        with pytest.raises((ValueError, KeyError)):
            peft_model.load_adapter(path, adapter_name="new")
        assert (model_state(peft_model), peft_model.active_adapter, list(peft_model.peft_config)) == before
    with pytest.raises(ValueError):
        peft_model.add_adapter("new", LoraConfig(target_modules=["no_such_module"]))
    assert (model_state(peft_model), peft_model.active_adapter, list(peft_model.peft_config)) == before
    # and the model still takes adapters afterwards
    peft_model.load_adapter(saved(tmp_path, "good", LoraConfig(target_modules=["c_fc"])), adapter_name="new")
    assert "new" in peft_model.peft_config
