"""Selective fine-tuning: what is selected (BitFit, norms, last layers), the errors, and the adapter
contract for a method that trains base weights in place (disable, unload, merge, files)."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, build, inputs, output
from parity import nudge
from safetensors.torch import load_file

from peftkit import LoraConfig, PeftModel, SelectiveConfig, get_peft_model
from peftkit.methods.selective import BIAS_PATTERNS, NORM_PATTERNS
from peftkit.presets import MethodOptions, build_config


def selected(model) -> list[str]:
    """Names (in the base model) of the parameters that train."""
    return [n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("arch", ["gpt2", "bart", "bert"])
def test_bitfit_trains_exactly_the_biases(arch):
    model = get_peft_model(build(arch), SelectiveConfig(patterns=BIAS_PATTERNS))
    biases = [n for n, _ in build(arch).named_parameters() if n.endswith(".bias")]
    assert selected(model) == biases and biases


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_bitfit_on_a_model_without_biases_is_refused_and_says_why(arch):
    with pytest.raises(ValueError, match=r"selects no parameter of .*nothing to train.*biases.*named like: .*\.N\."):
        get_peft_model(build(arch), SelectiveConfig(patterns=BIAS_PATTERNS))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_norm_pattern_selects_all_and_only_normalization_layers(arch):
    base = build(arch)
    norm_params = {
        f"{m}.{n}" if m else n
        for m, module in base.named_modules()
        if "norm" in type(module).__name__.lower()
        for n, _ in module.named_parameters(recurse=False)
    }
    model = get_peft_model(base, SelectiveConfig(patterns=NORM_PATTERNS))
    assert set(selected(model)) == norm_params and norm_params


@pytest.mark.parametrize(
    "arch,stacks", [("t5", ["encoder.block.1.", "decoder.block.1."]), ("bart", ["model.encoder.layers.1.", "model.decoder.layers.1."]),
                    ("gpt2", ["transformer.h.1."]), ("llama", ["model.layers.1."]), ("bert", ["encoder.layer.1."])]
)
def test_last_layer_of_each_stack(arch, stacks):
    model = get_peft_model(build(arch), SelectiveConfig(layers=[-1]))
    names = selected(model)
    expected = [n for n, _ in build(arch).named_parameters() if any(n.startswith(s) for s in stacks)]
    assert names == expected and expected  # T5's "block.0.layer.1" is a sub-layer of block 0: not selected


def test_patterns_and_layers_combine():
    model = get_peft_model(build("gpt2"), SelectiveConfig(patterns=[r"attn\."], layers=[0]))
    assert selected(model) == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                               "transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias"]


def test_a_layer_index_that_no_stack_has_is_refused():
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist .*transformer.h \(2\)"):
        get_peft_model(build("gpt2"), SelectiveConfig(patterns=BIAS_PATTERNS, layers=[0, 5]))


@pytest.mark.parametrize(
    "kwargs,message",
    [({}, "FullConfig"), ({"patterns": r"\.bias$"}, "non-empty list"), ({"patterns": ["("]}, "not a valid regex"),
     ({"layers": [True]}, "list of integers"), ({"layers": []}, "list of integers")],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelectiveConfig(**kwargs)


def test_disable_adapter_gives_the_base_outputs_and_the_trained_values_come_back():
    model = get_peft_model(build("bart"), SelectiveConfig(patterns=BIAS_PATTERNS))
    nudge(model)
    batch = inputs("bart")
    trained = output(model, batch)
    base = output(build("bart"), batch)
    assert not torch.equal(trained, base)
    with model.disable_adapter():
        assert torch.equal(output(model, batch), base)
        with model.disable_adapter():  # nested: still the base
            assert torch.equal(output(model, batch), base)
        assert torch.equal(output(model, batch), base)
    assert torch.equal(output(model, batch), trained)


def test_saved_file_holds_only_the_selected_tensors(tmp_path):
    model = get_peft_model(build("gpt2"), SelectiveConfig(patterns=BIAS_PATTERNS, layers=[1]))
    model.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {"base_model.model." + n for n in selected(model)} and len(keys) == 6  # ln_1, c_attn, c_proj, ln_2, c_fc, c_proj


def test_a_file_for_another_selection_is_refused(tmp_path):
    get_peft_model(build("gpt2"), SelectiveConfig(patterns=BIAS_PATTERNS)).save_pretrained(tmp_path / "a")
    model = get_peft_model(build("gpt2"), SelectiveConfig(patterns=BIAS_PATTERNS, layers=[0]))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(KeyError, match="must hold exactly the parameters this config selects"):
        model._tuners["default"].load_state_dict(load_file(str(tmp_path / "a" / "adapter_model.safetensors")), "a")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_merge_and_unload_keeps_the_trained_values_unload_restores_the_originals():
    model = get_peft_model(build("bert"), SelectiveConfig(patterns=NORM_PATTERNS))
    nudge(model)
    trained = {n.removeprefix("base_model.model."): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    plain = model.merge_and_unload()
    assert all(torch.equal(plain.get_parameter(n), t) for n, t in trained.items())
    assert all(p.requires_grad for p in plain.parameters())

    model = get_peft_model(build("bert"), SelectiveConfig(patterns=NORM_PATTERNS))
    nudge(model)
    original = build("bert")
    plain = model.unload()
    assert all(torch.equal(plain.get_parameter(n), original.get_parameter(n)) for n in trained)


def test_disable_adapter_is_refused_while_merged():
    model = get_peft_model(build("gpt2"), SelectiveConfig(patterns=BIAS_PATTERNS))
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="merged"):
        with model.disable_adapter():
            pass


def test_cannot_share_the_model_with_another_adapter():
    model = get_peft_model(build("gpt2"), SelectiveConfig(patterns=BIAS_PATTERNS))
    with pytest.raises(ValueError, match="cannot share a model"):
        model.add_adapter("lora", LoraConfig(r=2))


def test_round_trip_through_files_and_presets(tmp_path):
    config = build_config("selective", MethodOptions(patterns=[r"ln_f"], layers=None))
    assert config == SelectiveConfig(patterns=[r"ln_f"])
    assert build_config("bitfit", MethodOptions()).patterns == BIAS_PATTERNS
    assert build_config("last_layers", MethodOptions()).layers == [-1]
    assert build_config("last_layers", MethodOptions(layers=[-2, -1])).layers == [-2, -1]
    with pytest.raises(ValueError, match="does not use option"):
        build_config("bitfit", MethodOptions(rank=4))
    model = get_peft_model(build("gpt2"), config)
    nudge(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("gpt2"), tmp_path)
    assert loaded.peft_config["default"].patterns == [r"ln_f"]
    assert torch.equal(output(loaded, inputs("gpt2")), output(model, inputs("gpt2")))
