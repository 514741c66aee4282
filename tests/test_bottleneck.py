"""Bottleneck adapters: where each placement goes, the math, parameter counts, files, errors.

The contract tests (tests/test_contract.py) run the three placements on all tiny architectures too.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import build, inputs, output
from torch import nn

from peftkit import BottleneckConfig, LoraConfig, PeftModel, get_peft_model
from peftkit.inject import hosts
from peftkit.methods.bottleneck import BottleneckLayer, FeedForwardInputTap
from peftkit.presets import MethodOptions, build_config

PLACEMENTS = ["pfeiffer", "houlsby", "parallel"]
HIDDEN, LAYERS = 32, 2  # of every tiny model in conftest

# Which modules get an adapter ("adapter") or only record their input for a parallel adapter ("tap"),
# with the block index written as N. Every entry occurs once per block.
T5_FFN = {"encoder.block.N.layer.1.DenseReluDense": "adapter", "decoder.block.N.layer.2.DenseReluDense": "adapter"}
BART_FFN = {"model.encoder.layers.N.fc2": "adapter", "model.decoder.layers.N.fc2": "adapter"}
EXPECTED = {
    ("t5", "pfeiffer"): T5_FFN,
    ("t5", "houlsby"): {
        **T5_FFN, "encoder.block.N.layer.0.SelfAttention.o": "adapter", "decoder.block.N.layer.0.SelfAttention.o": "adapter",
    },
    ("t5", "parallel"): T5_FFN,
    ("bart", "pfeiffer"): BART_FFN,
    ("bart", "houlsby"): {
        **BART_FFN, "model.encoder.layers.N.self_attn.out_proj": "adapter", "model.decoder.layers.N.self_attn.out_proj": "adapter",
    },
    ("bart", "parallel"): {**BART_FFN, "model.encoder.layers.N.fc1": "tap", "model.decoder.layers.N.fc1": "tap"},
    ("gpt2", "pfeiffer"): {"transformer.h.N.mlp": "adapter"},
    ("gpt2", "houlsby"): {"transformer.h.N.mlp": "adapter", "transformer.h.N.attn.c_proj": "adapter"},
    ("gpt2", "parallel"): {"transformer.h.N.mlp": "adapter"},
    ("llama", "pfeiffer"): {"model.layers.N.mlp": "adapter"},
    ("llama", "houlsby"): {"model.layers.N.mlp": "adapter", "model.layers.N.self_attn.o_proj": "adapter"},
    ("llama", "parallel"): {"model.layers.N.mlp": "adapter"},
    ("bert", "pfeiffer"): {"encoder.layer.N.output.dense": "adapter"},
    ("bert", "houlsby"): {"encoder.layer.N.output.dense": "adapter", "encoder.layer.N.attention.output.dense": "adapter"},
    ("bert", "parallel"): {"encoder.layer.N.output.dense": "adapter", "encoder.layer.N.intermediate": "tap"},
}


def adapter_layers(model: PeftModel, name: str = "default") -> Counter:
    """Counter of (module path with the block index as N, "adapter" | "tap") over the adapter's layers."""
    found = Counter()
    for path, host in hosts(model.get_base_model()):
        if name in host.adapters:
            kind = "tap" if isinstance(host.adapters[name], FeedForwardInputTap) else "adapter"
            found[(re.sub(r"\.\d+\.", ".N.", path, count=1), kind)] += 1
    return found


def randomize(model: PeftModel, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def bottleneck(layer: BottleneckLayer, z: torch.Tensor, act) -> torch.Tensor:
    """``scaling * up(act(down(z)))`` written out with the layer's tensors."""
    down, up = layer.adapter_down, layer.adapter_up
    return layer.scaling * F.linear(act(F.linear(z, down.weight, down.bias)), up.weight, up.bias)


# --- placement --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_each_placement_wraps_the_modules_it_should(arch, placement):
    model = get_peft_model(build(arch), BottleneckConfig(bottleneck_size=8, placement=placement))
    expected = Counter({(path, kind): LAYERS for path, kind in EXPECTED[(arch, placement)].items()})
    assert adapter_layers(model) == expected


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_fresh_adapter_changes_no_output_bit(arch, placement):
    batch = inputs(arch)
    reference = output(build(arch), batch)
    model = get_peft_model(build(arch), BottleneckConfig(bottleneck_size=8, placement=placement))
    assert torch.equal(output(model, batch), reference)
    layers = [h.adapters["default"] for _, h in hosts(model.get_base_model()) if isinstance(h.adapters["default"], BottleneckLayer)]
    assert layers and all(not l.adapter_up.weight.any() and not l.adapter_up.bias.any() for l in layers)
    assert all(l.adapter_down.weight.abs().sum() > 0 for l in layers), "a zero down-projection would get no gradient"


# --- the math ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["pfeiffer", "parallel"])
def test_llama_mlp_output_follows_the_formula(placement):
    model = get_peft_model(
        build("llama"), BottleneckConfig(bottleneck_size=8, placement=placement, non_linearity="tanh", scaling=2.0)
    )
    randomize(model)
    host = model.base_model.model.model.layers[1].mlp
    seen = {}
    host.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    output(model, inputs("llama"))
    x, layer = seen["x"], host.adapters["default"]
    ffn = host.base_layer(x)
    expected = ffn + bottleneck(layer, ffn, torch.tanh) if placement == "pfeiffer" else ffn + bottleneck(layer, x, torch.tanh)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seen["out"], ffn, atol=1e-3), "the randomized adapter should change the output"


@pytest.mark.parametrize("arch,first,last", [("bart", "fc1", "fc2"), ("bert", "intermediate", "output.dense")])
def test_parallel_adapter_on_a_two_module_ffn_reads_the_ffn_input(arch, first, last):
    """BART and BERT have no module for the whole feed-forward block: the adapter reads the input of its first
    module and adds to the output of its last, ``ffn(x) + g(x)``."""
    model = get_peft_model(build(arch), BottleneckConfig(bottleneck_size=8, placement="parallel", non_linearity="silu"))
    randomize(model)
    block = dict(model.get_base_model().named_modules())["model.encoder.layers.1" if arch == "bart" else "encoder.layer.1"]
    first_host, last_host = block.get_submodule(first), block.get_submodule(last)
    seen = {}
    first_host.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    last_host.register_forward_hook(lambda mod, args, out: seen.update(h=args[0], out=out))
    output(model, inputs(arch))
    layer = last_host.adapters["default"]
    expected = last_host.base_layer(seen["h"]) + bottleneck(layer, seen["x"], F.silu)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-6)
    assert layer.adapter_down.in_features == HIDDEN and layer.adapter_up.out_features == HIDDEN
    assert layer.stash.x is None, "the recorded input must be released once used"


@pytest.mark.parametrize("name,fn", [("relu", F.relu), ("gelu", F.gelu), ("silu", F.silu), ("tanh", torch.tanh)])
def test_non_linearities(name, fn):
    model = get_peft_model(build("gpt2"), BottleneckConfig(bottleneck_size=8, non_linearity=name))
    layer = model.base_model.model.transformer.h[0].mlp.adapters["default"]
    z = torch.linspace(-3, 3, 61)
    assert torch.equal(layer.act(z), fn(z))


def test_scaling_multiplies_the_adapter_output():
    z = torch.randn(2, 5, HIDDEN)
    deltas = []
    for scaling in (1.0, 3.0):
        model = get_peft_model(build("llama"), BottleneckConfig(bottleneck_size=8, scaling=scaling))
        randomize(model)  # same seed: same weights in both models
        deltas.append(model.base_model.model.model.layers[0].mlp.adapters["default"].delta(z))
    assert deltas[0].abs().sum() > 0
    torch.testing.assert_close(deltas[1], 3.0 * deltas[0], rtol=1e-6, atol=1e-6)


# --- parameter counts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,placement,sites", [
    ("llama", "pfeiffer", 2), ("llama", "houlsby", 4), ("llama", "parallel", 2),
    ("bart", "parallel", 4),  # 2 encoder + 2 decoder layers; the fc1 taps have no parameters
    ("t5", "houlsby", 2 * 2 + 2 * 2),
])
def test_trainable_parameters_are_2db_plus_b_plus_d_per_adapter(arch, placement, sites):
    b = 8
    model = get_peft_model(build(arch), BottleneckConfig(bottleneck_size=b, placement=placement))
    per_adapter = 2 * HIDDEN * b + b + HIDDEN
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sites * per_adapter
    assert total == sum(p.numel() for p in build(arch).parameters()) + trainable
    assert f"{sites * per_adapter:,d}" in model.trainable_parameters_table()


# --- files ------------------------------------------------------------------------------------------------
def test_save_and_load_a_parallel_bart_adapter(tmp_path):
    config = BottleneckConfig(bottleneck_size=8, placement="parallel", non_linearity="gelu", scaling=4.0)
    model = get_peft_model(build("bart"), config)
    randomize(model)
    batch = inputs("bart")
    expected = output(model, batch)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK"
    assert (saved["placement"], saved["bottleneck_size"], saved["non_linearity"], saved["scaling"]) == ("parallel", 8, "gelu", 4.0)
    assert saved["target_modules"] == ["fc2"] and saved["parallel_input_modules"] == ["fc1"]  # the defaults it used
    keys = set(model._tuners["default"].state_dict())
    assert "base_model.model.model.encoder.layers.0.fc2.adapter_down.weight" in keys
    assert len(keys) == 4 * 4 and not any(".fc1." in k for k in keys), "taps hold no tensors"

    loaded = PeftModel.from_pretrained(build("bart"), tmp_path)
    assert torch.equal(output(loaded, batch), expected)
    assert adapter_layers(loaded) == adapter_layers(model)


def test_loading_into_a_different_bottleneck_size_names_the_key_and_shapes(tmp_path):
    model = get_peft_model(build("llama"), BottleneckConfig(bottleneck_size=8))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "bottleneck_size": 4}))
    with pytest.raises(ValueError, match=r"adapter_(down|up)\.(weight|bias)' has shape \(\S*8\S*\) but the model expects \(\S*4\S*\)"):
        PeftModel.from_pretrained(build("llama"), tmp_path)


# --- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    ({"placement": "middle"}, "placement must be one of"),
    ({"bottleneck_size": 0}, "bottleneck_size must be an integer >= 1"),
    ({"bottleneck_size": -4}, "bottleneck_size must be an integer >= 1"),
    ({"bottleneck_size": 2.5}, "bottleneck_size must be an integer >= 1"),
    ({"bottleneck_size": True}, "bottleneck_size must be an integer >= 1"),
    ({"non_linearity": "swish"}, "non_linearity must be one of"),
    ({"scaling": 0}, "scaling must be a positive number"),
    ({"target_modules": [1]}, "target_modules must be"),
    ({"placement": "houlsby", "parallel_input_modules": ["fc1"]}, "only used with placement='parallel'"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BottleneckConfig(**kwargs)


class Toy(nn.Module):
    """A model of no known architecture: two blocks, each with a feed-forward ``ffn``."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ffn": nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))}) for _ in range(2)
        )

    def forward(self, x):
        for block in self.blocks:
            x = x + block["ffn"](x)
        return x


def test_an_unknown_architecture_needs_target_modules_and_is_told_what_exists():
    model = Toy()
    with pytest.raises(ValueError, match="no default target_modules") as error:
        get_peft_model(model, BottleneckConfig(bottleneck_size=4))
    assert "set target_modules" in str(error.value).lower() and "ffn (Sequential)" in str(error.value)
    assert not list(hosts(model)), "a refused adapter must leave the model unchanged"

    x = torch.randn(3, 16)
    reference = model(x)
    peft_model = get_peft_model(model, BottleneckConfig(bottleneck_size=4, target_modules=["ffn"]))
    assert [p for p, _ in hosts(peft_model.get_base_model())] == ["blocks.0.ffn", "blocks.1.ffn"]
    assert torch.equal(peft_model(x), reference)


def test_a_target_that_returns_a_tuple_is_refused_with_advice():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x), None

    model = get_peft_model(nn.Sequential(Pair()), BottleneckConfig(bottleneck_size=2, target_modules=["0"]))
    with pytest.raises(TypeError, match="returns one tensor"):
        model(torch.randn(2, 8))


def test_merging_is_refused_and_changes_nothing():
    model = get_peft_model(build("llama"), BottleneckConfig(bottleneck_size=8))
    randomize(model)
    batch = inputs("llama")
    before = output(model, batch)
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_and_unload()
    assert torch.equal(output(model, batch), before)


def test_parallel_input_modules_must_pick_one_module_per_target():
    with pytest.raises(ValueError, match="matches no module"):
        get_peft_model(build("bart"), BottleneckConfig(placement="parallel", target_modules=["fc2"], parallel_input_modules=["fc9"]))
    with pytest.raises(ValueError, match="several targets"):  # every fc2 of a stack pairs with the same module
        get_peft_model(build("bart"), BottleneckConfig(placement="parallel", target_modules=["fc2"], parallel_input_modules=["embed_tokens"]))


# --- with other adapters ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bottleneck_first", [True, False])
def test_lora_inside_a_bottleneck_wrapped_block(bottleneck_first):
    """LoRA on ``mlp.down_proj`` while a bottleneck adapter wraps ``mlp``: both run, keys stay LoRA's own."""
    lora, neck = LoraConfig(r=4, target_modules=["down_proj"]), BottleneckConfig(bottleneck_size=8)
    first, second = (("neck", neck), ("lora", lora)) if bottleneck_first else (("lora", lora), ("neck", neck))
    model = get_peft_model(build("llama"), first[1], first[0])
    model.add_adapter(*second)
    for name in ("lora", "neck"):
        model.set_adapter(name)
        randomize(model, seed=len(name))

    lora_alone = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["down_proj"]))
    assert set(model._tuners["lora"].state_dict()) == set(lora_alone._tuners["default"].state_dict())
    lora_alone._tuners["default"].load_state_dict(model._tuners["lora"].state_dict(), "test")

    batch = inputs("llama", batch=3)
    model.set_adapter("lora")
    with_lora = output(model, batch)
    assert torch.equal(with_lora, output(lora_alone, batch))
    assert not torch.allclose(with_lora, output(build("llama"), batch), atol=1e-3)

    mixed = output(model, batch, adapter_names=["neck", "lora", "__base__"])
    model.set_adapter("neck")
    torch.testing.assert_close(mixed[0:1], output(model, {k: v[0:1] for k, v in batch.items()}), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[1:2], with_lora[1:2], rtol=1e-4, atol=1e-5)

    plain = model.unload()
    reference = build("llama").state_dict()
    assert plain.state_dict().keys() == reference.keys()
    assert all(torch.equal(plain.state_dict()[k], reference[k]) for k in reference)


def test_preset():
    config = build_config("bottleneck", MethodOptions(bottleneck_size=16, placement="houlsby"))
    assert isinstance(config, BottleneckConfig) and (config.bottleneck_size, config.placement) == (16, "houlsby")
    with pytest.raises(ValueError, match="does not use option"):
        build_config("bottleneck", MethodOptions(rank=4))
    with pytest.raises(ValueError, match="placement must be one of"):
        build_config("bottleneck", MethodOptions(placement="after"))
