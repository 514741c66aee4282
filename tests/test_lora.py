"""LoRA specifics: the config, the seed's worked example, targeting, layer types, initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build, inputs, output
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import LoraConfig, get_peft_model
from peftkit.methods.lora import LoraLinear


# --- the config validates itself -------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be an integer >= 1"),
        ({"r": 2.5}, "r must be an integer >= 1"),
        ({"lora_alpha": 0}, "lora_alpha must be a positive number"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\)"),
        ({"bias": "some"}, "bias must be 'none', 'all' or 'lora_only'"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights must be True, False or 'gaussian'"),
        ({"target_modules": 3}, "target_modules must be a list of module names"),
        ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\] must be an integer >= 1"),
        ({"task_type": "CHAT"}, "task_type='CHAT' is not one of"),
    ],
)
def test_config_refuses_mistakes_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_config_defaults_match_the_issue():
    c = LoraConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.bias, c.use_rslora, c.init_lora_weights) == (8, 8, 0.0, "none", False, True)
    assert c.target_modules is None and c.rank_pattern == {} and c.fan_in_fan_out is None


# --- the seed's worked example ---------------------------------------------------------------------
def test_seed_example_512_by_64_weight_rank_8_trains_4608_parameters(capsys):
    model = get_peft_model(nn.Sequential(nn.Linear(64, 512, bias=False)), LoraConfig(r=8, target_modules=["0"]))
    layer = model.get_base_model()[0].adapters["default"]
    assert tuple(layer.lora_A.weight.shape) == (8, 64)  # A: r x k
    assert tuple(layer.lora_B.weight.shape) == (512, 8)  # B: d x r
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 8 * 64 + 512 * 8 == 4608
    assert total == 32768 + 4608
    assert round(100 * (1 - trainable / 32768)) == 86  # "86% fewer"
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == "trainable params: 4,608 || all params: 37,376 || trainable%: 12.3288"
    table = model.trainable_parameters_table()
    assert "lora_A.weight (8, 64)" in table and "4,608" in table and "32,768" in table


# --- the math --------------------------------------------------------------------------------------
def test_forward_is_w_x_plus_scaled_b_a_x():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    model = get_peft_model(nn.Sequential(base), LoraConfig(r=4, lora_alpha=12, target_modules=["0"], init_lora_weights=False))
    layer = model.get_base_model()[0].adapters["default"]
    x = torch.randn(3, 16)
    expected = base(x) + (12 / 4) * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(model(x), expected)
    assert layer.scaling == 3.0


def test_rslora_scales_by_alpha_over_sqrt_r():
    model = get_peft_model(nn.Sequential(nn.Linear(32, 32)), LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["0"]))
    assert model.get_base_model()[0].adapters["default"].scaling == pytest.approx(8 / math.sqrt(16))


def test_default_init_kaiming_a_zero_b_and_gaussian_init():
    torch.manual_seed(0)
    layer = get_peft_model(nn.Sequential(nn.Linear(256, 64)), LoraConfig(r=8, target_modules=["0"])).get_base_model()[0].adapters["default"]
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on a (8, 256) weight
    assert layer.lora_A.weight.abs().max() <= bound
    torch.manual_seed(0)
    g = get_peft_model(nn.Sequential(nn.Linear(256, 64)), LoraConfig(r=8, target_modules=["0"], init_lora_weights="gaussian"))
    a = g.get_base_model()[0].adapters["default"].lora_A.weight
    assert torch.count_nonzero(g.get_base_model()[0].adapters["default"].lora_B.weight) == 0
    assert a.std().item() == pytest.approx(1 / 8, rel=0.1)


def test_dropout_is_identity_when_zero_and_active_only_in_training():
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(target_modules=["0"], lora_dropout=0.0))
    assert isinstance(model.get_base_model()[0].adapters["default"].lora_dropout, nn.Identity)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(target_modules=["0"], lora_dropout=0.5, init_lora_weights=False))
    x = torch.randn(4, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x))


# --- targeting -------------------------------------------------------------------------------------
DEFAULT_TARGETS = {"t5": {"q", "v"}, "bart": {"q_proj", "v_proj"}, "gpt2": {"c_attn"}, "llama": {"q_proj", "v_proj"}, "bert": {"query", "value"}}


@pytest.mark.parametrize("arch", list(DEFAULT_TARGETS))
def test_default_targets_are_attention_query_and_value(arch):
    model = get_peft_model(build(arch), LoraConfig())
    adapted = {path.rsplit(".", 1)[-1] for path in model._tuners["default"].paths}
    assert adapted == DEFAULT_TARGETS[arch]


def test_target_list_matches_suffixes_and_regex_matches_full_names():
    model = get_peft_model(build("llama"), LoraConfig(target_modules=["k_proj"]))
    assert model._tuners["default"].paths == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    model = get_peft_model(build("llama"), LoraConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj"))
    assert model._tuners["default"].paths == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_all_linear_skips_the_output_head_and_exclude_modules_works():
    model = get_peft_model(build("llama"), LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"]))
    paths = model._tuners["default"].paths
    assert len(paths) == 2 * 6  # q k v up gate down per layer, o_proj excluded
    assert not any(p.endswith(("lm_head", "o_proj")) for p in paths)


def test_a_target_that_matches_nothing_lists_the_modules_that_exist():
    with pytest.raises(ValueError) as err:
        get_peft_model(build("llama"), LoraConfig(target_modules=["query"]))
    message = str(err.value)
    assert "matches no module" in message and "q_proj (Linear)" in message and "embed_tokens (Embedding)" in message


def test_a_target_of_an_unsupported_type_is_refused():
    with pytest.raises(ValueError, match="supports Linear, Conv1D, Embedding, Conv2d"):
        get_peft_model(build("llama"), LoraConfig(target_modules=["input_layernorm"]))


def test_unknown_architecture_without_targets_says_what_to_set():
    with pytest.raises(ValueError, match="set target_modules"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig())


def test_rank_and_alpha_patterns_override_per_module():
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 16})
    model = get_peft_model(build("llama"), config)
    layers = dict(model._tuners["default"].layers())
    assert layers["model.layers.0.self_attn.v_proj"].r == 2
    assert layers["model.layers.0.self_attn.q_proj"].r == 4 and layers["model.layers.0.self_attn.q_proj"].scaling == 1.0
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 4.0


# --- layer types -----------------------------------------------------------------------------------
def test_gpt2_conv1d_uses_transposed_weights_and_merges_exactly():
    model = get_peft_model(build("gpt2"), LoraConfig(r=4, init_lora_weights=False))
    layer = dict(model._tuners["default"].layers())["transformer.h.0.attn.c_attn"]
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    host = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(host.base_layer, Conv1D)
    assert layer.delta_weight().shape == host.base_layer.weight.shape == (32, 96)
    batch = inputs("gpt2")
    before = output(model, batch)
    model.merge_adapter()
    torch.testing.assert_close(output(model, batch), before, rtol=1e-4, atol=1e-5)


def test_fan_in_fan_out_that_contradicts_the_layer_is_refused():
    with pytest.raises(ValueError, match="fan_in_fan_out=False but .* is a Conv1D"):
        get_peft_model(build("gpt2"), LoraConfig(fan_in_fan_out=False))
    with pytest.raises(ValueError, match="fan_in_fan_out=True but .* is a Linear"):
        get_peft_model(build("llama"), LoraConfig(fan_in_fan_out=True))


def test_embedding_lora_is_a_noop_at_init_and_merges_exactly():
    batch = inputs("llama")
    reference = output(build("llama"), batch)
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["embed_tokens"]))
    torch.testing.assert_close(output(model, batch), reference, rtol=0, atol=0)
    with torch.no_grad():
        model._tuners["default"].layers()[0][1].lora_embedding_A.normal_()
    changed = output(model, batch)
    assert not torch.allclose(changed, reference)
    model.merge_adapter()
    torch.testing.assert_close(output(model, batch), changed, rtol=1e-4, atol=1e-5)


def test_conv2d_lora_forward_and_merge_agree():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_lora_works_on_any_torch_module():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(10, 20)
            self.head = nn.Linear(20, 2)

        def forward(self, x):
            return self.head(torch.relu(self.encoder(x)))

    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["encoder"]))
    x = torch.randn(5, 10)
    loss = model(x).pow(2).sum()
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"base_model.model.encoder.adapters.default.lora_A.weight", "base_model.model.encoder.adapters.default.lora_B.weight"}


# --- bias and modules_to_save ----------------------------------------------------------------------
def test_bias_lora_only_trains_biases_of_adapted_layers_and_saves_them(tmp_path):
    model = get_peft_model(build("gpt2"), LoraConfig(bias="lora_only"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in names
    assert not any("c_proj.bias" in n for n in names)
    keys = set(model._tuners["default"].state_dict())
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in keys


def test_bias_all_trains_every_bias():
    model = get_peft_model(build("gpt2"), LoraConfig(bias="all"))
    biases = {n for n, _ in model.get_base_model().named_parameters() if n.endswith(".bias") and ".adapters." not in n}
    trainable = {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}
    assert biases <= trainable


def test_modules_to_save_trains_a_copy_and_merges_into_the_original():
    batch = inputs("llama")
    model = get_peft_model(build("llama"), LoraConfig(r=4, modules_to_save=["lm_head"]))
    head_copy = dict(model._tuners["default"].layers())["lm_head"].module
    assert head_copy.weight.requires_grad
    assert not model.base_model.model.lm_head.base_layer.weight.requires_grad
    with torch.no_grad():
        head_copy.weight.add_(0.1)
    changed = output(model, batch)
    with model.disable_adapter():
        assert not torch.allclose(output(model, batch), changed)
    plain = model.merge_and_unload()
    torch.testing.assert_close(output(plain, batch), changed, rtol=1e-4, atol=1e-5)


def test_trained_biases_are_hidden_by_disable_restored_by_unload_and_kept_by_merge():
    batch = inputs("gpt2")
    reference = output(build("gpt2"), batch)
    model = get_peft_model(build("gpt2"), LoraConfig(r=4, bias="all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith(".bias"):
                p.add_(0.1)
    trained = output(model, batch)
    assert not torch.allclose(trained, reference)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, batch), reference, rtol=0, atol=0)
    torch.testing.assert_close(output(model, batch), trained, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot share a model"):
        model.add_adapter("other", LoraConfig(r=2))
    with pytest.raises(ValueError, match="cannot share a batch"):
        model(**batch, adapter_names=["default", "__base__"])
    plain = model.unload()
    for (n, a), b in zip(build("gpt2").state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), n

    model = get_peft_model(build("gpt2"), LoraConfig(r=4, bias="lora_only"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith(".bias"):
                p.add_(0.1)
    trained = output(model, batch)
    torch.testing.assert_close(output(model.merge_and_unload(), batch), trained, rtol=1e-5, atol=1e-5)
