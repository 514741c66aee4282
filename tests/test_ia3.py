"""(IA)^3: the math, the errors, and parity with ``peft`` (defaults, outputs, files both ways, merging)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import ARCHS, build, inputs, output
from parity import load_in_peft, max_abs_diff, merged_diff_vs_peft, nudge, peft_model, saved_shapes

from peftkit import IA3Config, PeftModel, get_peft_model
from peftkit.methods.ia3 import IA3Linear

TOL = 1e-5


@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_targets_and_file_layout_match_peft(arch, tmp_path):
    get_peft_model(build(arch), IA3Config()).save_pretrained(tmp_path / "peftkit")
    peft_model(arch, peft.IA3Config()).save_pretrained(tmp_path / "peft")
    assert saved_shapes(tmp_path / "peftkit") == saved_shapes(tmp_path / "peft")
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peftkit", "peft"))
    for key in ("target_modules", "feedforward_modules", "fan_in_fan_out"):
        mine, ref = ours[key], theirs[key]
        assert (set(mine) if isinstance(mine, list) else mine) == (set(ref) if isinstance(ref, list) else ref), key


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peftkit_file_loads_in_peft_with_equal_outputs(arch, tmp_path):
    model = get_peft_model(build(arch), IA3Config())
    nudge(model)
    batch = inputs(arch)
    ours = output(model, batch)
    with model.disable_adapter():
        assert max_abs_diff(output(model, batch), ours) > 1e-3, "the nudged adapter must change the outputs"
    model.save_pretrained(tmp_path)
    diff = max_abs_diff(output(load_in_peft(arch, tmp_path), batch), ours)
    print(f"IA3 {arch}: peftkit file in peft, max abs diff {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_file_loads_in_peftkit_with_equal_outputs(arch, tmp_path):
    reference = peft_model(arch, peft.IA3Config())
    nudge(reference)
    reference.save_pretrained(tmp_path)
    batch = inputs(arch)
    theirs = output(reference.eval(), batch)
    assert max_abs_diff(output(build(arch), batch), theirs) > 1e-3, "the nudged adapter must change the outputs"
    loaded = PeftModel.from_pretrained(build(arch), tmp_path)
    diff = max_abs_diff(output(loaded, batch), theirs)
    print(f"IA3 {arch}: peft file in peftkit, max abs diff {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart"])
def test_merged_weights_match_peft(arch, tmp_path):
    model = get_peft_model(build(arch), IA3Config())
    nudge(model)
    diff = merged_diff_vs_peft(model, arch, tmp_path)
    print(f"IA3 {arch}: merged weights vs peft, max abs diff {diff:.2e}")
    assert diff < TOL


def test_vectors_scale_the_output_of_keys_and_the_input_of_the_feed_forward_layer():
    model = get_peft_model(build("llama"), IA3Config())
    mlp = model.base_model.model.model.layers[0].mlp
    down, k_proj = mlp.down_proj.adapters["default"], model.base_model.model.model.layers[0].self_attn.k_proj.adapters["default"]
    assert down.ia3_l.shape == (1, 64) and k_proj.ia3_l.shape == (16, 1)  # (1, in) and (out, 1)
    nudge(model)
    x = torch.randn(2, 3, 64)
    base = mlp.down_proj.base_layer
    torch.testing.assert_close(mlp.down_proj(x), base(x * down.ia3_l.flatten()))
    x = torch.randn(2, 3, 32)
    host = model.base_model.model.model.layers[0].self_attn.k_proj
    torch.testing.assert_close(host(x), host.base_layer(x) * k_proj.ia3_l.flatten())


def test_output_scale_also_scales_the_bias_when_merged():
    layer = torch.nn.Linear(4, 3)
    ia3 = IA3Linear(layer, is_feedforward=False, fan_in_fan_out=False, init=False)
    x = torch.randn(5, 4)
    expected = ia3(x, layer)
    ia3.merge(layer)
    torch.testing.assert_close(layer(x), expected)
    ia3.unmerge(layer)
    torch.testing.assert_close(layer(x), expected / ia3.ia3_l.flatten())


def test_feedforward_modules_must_be_targets():
    with pytest.raises(ValueError, match="feedforward_modules .*'wo'.* not in target_modules"):
        IA3Config(target_modules=["k", "v"], feedforward_modules=["wo"])


def test_fan_in_fan_out_that_contradicts_the_layer_is_refused():
    with pytest.raises(ValueError, match="fan_in_fan_out=False but .*c_attn is a Conv1D"):
        get_peft_model(build("gpt2"), IA3Config(fan_in_fan_out=False))


def test_unknown_architecture_needs_feedforward_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="set feedforward_modules"):
        get_peft_model(model, IA3Config(target_modules=["0", "2"]))
    peft_model_ = get_peft_model(model, IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    assert peft_model_.get_base_model()[2].adapters["default"].ia3_l.shape == (1, 4)


def test_non_linear_targets_are_refused_with_the_supported_types():
    with pytest.raises(ValueError, match="supports Linear, Conv1D"):
        get_peft_model(build("llama"), IA3Config(target_modules=["embed_tokens", "k_proj"], feedforward_modules=[]))


def test_unmerge_refuses_when_a_scale_is_zero_and_leaves_the_model_merged():
    model = get_peft_model(build("llama"), IA3Config())
    nudge(model)
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.v_proj.adapters["default"].ia3_l[3, 0] = 0.0
    batch = inputs("llama")
    model.merge_adapter()
    merged = output(model, batch)
    with pytest.raises(ValueError, match="zero entries"):
        model.unmerge_adapter()
    assert torch.equal(output(model, batch), merged)
