"""Adapters of different methods on one model: LoRA, DoRA and IA3 as named adapters, switched with
set_adapter or mixed per row in one batch; combinations that cannot work are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_mixed_rows_match_alone, build, inputs, output
from parity import nudge

from peftkit import FullConfig, IA3Config, LoraConfig, PeftModel, SelectiveConfig, get_peft_model
from peftkit.inject import AdapterHost

CONFIGS = {
    "lora": LoraConfig(r=4, lora_alpha=8),
    "ia3": IA3Config(),
    "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True),
}


def three_methods(arch: str) -> PeftModel:
    """LoRA ("default"), IA3 and DoRA on one model, each nudged so it changes the outputs. On GPT-2 all
    three sit on the same c_attn layers; on Llama LoRA/DoRA adapt q,v and IA3 k,v,down."""
    model = get_peft_model(build(arch), CONFIGS["lora"])
    nudge(model, seed=1)
    for i, name in enumerate(["ia3", "dora"]):
        model.add_adapter(name, CONFIGS[name])
        model.set_adapter(name)
        nudge(model, seed=2 + i)
    model.set_adapter("default")
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_each_adapter_alone_equals_a_model_with_only_that_adapter(arch, tmp_path):
    model = three_methods(arch)
    model.save_pretrained(tmp_path)  # "default" at the top, the others in sub-folders
    batch = inputs(arch)
    seen = []
    for name in ["default", "ia3", "dora"]:
        model.set_adapter(name)
        ours = output(model, batch)
        alone = PeftModel.from_pretrained(build(arch), tmp_path if name == "default" else tmp_path / name)
        assert type(alone.peft_config["default"]) is type(model.peft_config[name])
        torch.testing.assert_close(ours, output(alone, batch), rtol=0, atol=1e-6)
        assert all(not torch.allclose(ours, other) for other in seen), "adapters must differ from each other"
        seen.append(ours)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_mixed_batch_of_different_methods_equals_each_row_alone(arch):
    model = three_methods(arch)
    names = ["ia3", "default", "__base__", "dora"]
    batch = inputs(arch, batch=4)
    assert_mixed_rows_match_alone(model, batch, names, tol=1e-5)


def test_mixed_generate_equals_each_row_alone():
    model = three_methods("llama")
    batch = inputs("llama", batch=3)
    names = ["dora", "ia3", "default"]
    kw = dict(max_new_tokens=5, do_sample=False)
    mixed = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=names, **kw)
    for i, name in enumerate(names):
        model.set_adapter(name)
        alone = model.generate(input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1], **kw)
        assert torch.equal(mixed[i : i + 1], alone)


def test_merging_one_method_while_another_shares_its_layers():
    model = three_methods("gpt2")
    batch = inputs("gpt2")
    model.set_adapter("ia3")
    unmerged = output(model, batch)
    model.merge_adapter()
    torch.testing.assert_close(output(model, batch), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="'ia3' is merged"):
        model.set_adapter("dora")
    with pytest.raises(RuntimeError, match="merged"):
        output(model, batch, adapter_names=["default", "dora"])
    model.unmerge_adapter()
    model.set_adapter("dora")
    model.merge_adapter()  # a different method merged into the same c_attn weights
    model.unmerge_adapter()
    model.set_adapter("ia3")
    torch.testing.assert_close(output(model, batch), unmerged, rtol=1e-5, atol=1e-5)


def test_deleting_one_method_releases_only_its_layers():
    model = three_methods("llama")
    batch = inputs("llama")
    lora_out = output(model, batch)
    model.delete_adapter("ia3")
    layer0 = model.base_model.model.model.layers[0]
    assert type(layer0.mlp.down_proj) is torch.nn.Linear and type(layer0.self_attn.k_proj) is torch.nn.Linear
    assert isinstance(layer0.self_attn.v_proj, AdapterHost) and set(layer0.self_attn.v_proj.adapters) == {"default", "dora"}
    torch.testing.assert_close(output(model, batch), lora_out, rtol=0, atol=0)


@pytest.mark.parametrize("exclusive", [SelectiveConfig(patterns=[r"norm"]), FullConfig()], ids=["selective", "full"])
@pytest.mark.parametrize("layer_method", ["lora", "ia3", "dora"])
def test_methods_that_train_base_weights_cannot_share_a_model(exclusive, layer_method):
    model = get_peft_model(build("llama"), CONFIGS[layer_method])
    with pytest.raises(ValueError, match=f"{type(exclusive).__name__} cannot share a model with adapter"):
        model.add_adapter("other", exclusive)
    assert list(model.peft_config) == ["default"]
    model = get_peft_model(build("llama"), exclusive)
    with pytest.raises(ValueError, match="train the base weights themselves"):
        model.add_adapter("other", CONFIGS[layer_method])
