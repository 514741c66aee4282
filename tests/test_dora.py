"""DoRA (``LoraConfig(use_dora=True)``): the math, the errors, and parity with ``peft`` (outputs, files
both ways, gradients, merging) on Linear layers and GPT-2's Conv1D."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import ARCHS, build, inputs, output
from parity import load_in_peft, max_abs_diff, merged_diff_vs_peft, nudge, peft_model, saved_shapes
from safetensors.torch import load_file
from test_contract import loss_of

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.io.keys import HF_PREFIX
from peftkit.methods.dora import DoraLinear

TOL = 1e-5
# Default targets on every tiny model (Linear everywhere, Conv1D c_attn on GPT-2), and every linear
# layer of GPT-2 (c_attn, c_proj, c_fc: all Conv1D).
CONFIGS = [(arch, None) for arch in ARCHS] + [("gpt2", "all-linear")]


def dora(target_modules=None, **kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, use_dora=True, **kw)


def peft_dora(target_modules=None):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, use_dora=True)


@pytest.mark.parametrize("arch,targets", CONFIGS)
def test_file_layout_and_initial_magnitude_match_peft(arch, targets, tmp_path):
    get_peft_model(build(arch), dora(targets)).save_pretrained(tmp_path / "peftkit")
    peft_model(arch, peft_dora(targets)).save_pretrained(tmp_path / "peft")
    shapes = saved_shapes(tmp_path / "peftkit")
    assert shapes == saved_shapes(tmp_path / "peft")
    ours, theirs = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peftkit", "peft"))
    magnitudes = [k for k in ours if k.endswith(".lora_magnitude_vector")]
    assert magnitudes and all(len(shapes[k]) == 1 for k in magnitudes)
    for key in magnitudes:  # ||W||_row of the same base weights
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch,targets", CONFIGS)
def test_peftkit_file_loads_in_peft_with_equal_outputs(arch, targets, tmp_path):
    model = get_peft_model(build(arch), dora(targets))
    nudge(model)
    batch = inputs(arch)
    ours = output(model, batch)
    assert max_abs_diff(output(build(arch), batch), ours) > 1e-3, "the nudged adapter must change the outputs"
    model.save_pretrained(tmp_path)
    diff = max_abs_diff(output(load_in_peft(arch, tmp_path), batch), ours)
    print(f"DoRA {arch} {targets or 'default'}: peftkit file in peft, max abs diff {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("arch,targets", CONFIGS)
def test_peft_file_loads_in_peftkit_with_equal_outputs(arch, targets, tmp_path):
    reference = peft_model(arch, peft_dora(targets))
    nudge(reference)
    reference.save_pretrained(tmp_path)
    batch = inputs(arch)
    theirs = output(reference.eval(), batch)
    assert max_abs_diff(output(build(arch), batch), theirs) > 1e-3, "the nudged adapter must change the outputs"
    diff = max_abs_diff(output(PeftModel.from_pretrained(build(arch), tmp_path), batch), theirs)
    print(f"DoRA {arch} {targets or 'default'}: peft file in peftkit, max abs diff {diff:.2e}")
    assert diff < TOL


def _peft_key(name: str) -> str:
    # peft: ...q_proj.lora_A.default.weight / ...q_proj.lora_magnitude_vector.default.weight
    key = name.replace(".default", "")
    return key.removesuffix(".weight") if key.endswith("lora_magnitude_vector.weight") else key


@pytest.mark.parametrize("arch,targets", [("llama", None), ("gpt2", "all-linear")])
def test_gradients_match_peft(arch, targets, tmp_path):
    """The weight norm is a constant for backward in both (DoRA paper, section 4.3)."""
    model = get_peft_model(build(arch), dora(targets))
    nudge(model)
    model.save_pretrained(tmp_path)
    reference = load_in_peft(arch, tmp_path, is_trainable=True)
    batch = inputs(arch)
    loss_of(model, batch).backward()
    loss_of(reference, batch).backward()
    ours = {HF_PREFIX + n.replace(".adapters.default.", "."): p.grad for n, p in model._tuners["default"].named_parameters()}
    theirs = {_peft_key(n): p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    diff = max(max_abs_diff(ours[k], theirs[k]) for k in ours)
    print(f"DoRA {arch} {targets or 'default'}: gradients vs peft, max abs diff {diff:.2e}")
    assert all(ours[k].abs().sum() > 0 for k in ours if "magnitude" in k)
    assert diff < 1e-5


@pytest.mark.parametrize("arch,targets", [("llama", None), ("t5", None), ("gpt2", "all-linear")])
def test_merged_weights_match_peft(arch, targets, tmp_path):
    model = get_peft_model(build(arch), dora(targets))
    nudge(model)
    diff = merged_diff_vs_peft(model, arch, tmp_path)
    print(f"DoRA {arch} {targets or 'default'}: merged weights vs peft, max abs diff {diff:.2e}")
    assert diff < TOL


def test_merged_rows_have_the_magnitude_as_their_norm():
    layer = torch.nn.Linear(6, 5)
    dora_layer = DoraLinear(layer, r=2, alpha=4, dropout=0.0, rslora=False, init=False, fan_in_fan_out=False)
    with torch.no_grad():
        dora_layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 2.0, 5))
    before = layer.weight.detach().clone()
    dora_layer.merge(layer)
    torch.testing.assert_close(torch.linalg.norm(layer.weight, dim=1), dora_layer.lora_magnitude_vector.detach())
    dora_layer.unmerge(layer)
    torch.testing.assert_close(layer.weight, before)
    with pytest.raises(RuntimeError, match="not merged"):
        dora_layer.unmerge(layer)


def test_dropout_path_recomputes_the_base_term_on_the_dropped_input():
    """With dropout on, W x is recomputed from dropout(x); at p=0 that path must equal the shortcut."""
    model = get_peft_model(build("gpt2"), dora())
    nudge(model)
    batch = inputs("gpt2")
    shortcut = output(model, batch)
    for _, layer in model._tuners["default"].layers():
        layer.lora_dropout = torch.nn.Dropout(p=0.0)  # not Identity: takes the recomputing branch
    model.train()
    torch.testing.assert_close(output(model, batch), shortcut, rtol=1e-5, atol=1e-5)


def test_dora_on_an_embedding_is_refused():
    with pytest.raises(ValueError, match="use_dora=True.* Linear and Conv1D .*embed_tokens is a Embedding"):
        get_peft_model(build("llama"), dora(["embed_tokens", "q_proj"]))


def test_use_dora_must_be_a_bool():
    with pytest.raises(ValueError, match="use_dora must be True or False"):
        LoraConfig(use_dora="yes")


def test_dora_keeps_no_second_copy_of_the_base_weight():
    model = get_peft_model(build("llama"), dora())
    before = sum(p.numel() for p in build("llama").parameters())
    added = sum(p.numel() for _, p in model._tuners["default"].named_parameters())
    assert sum(p.numel() for p in model.parameters()) == before + added
    assert not any("base_module" in k for k in model.state_dict())
