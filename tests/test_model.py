"""PeftModel: named adapters, switching, disabling, merging, mixed batches and parameter accounting."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build, inputs, output

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.inject import AdapterHost


def two_adapters(arch="llama"):
    model = get_peft_model(build(arch), LoraConfig(r=4, init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj", "v_proj"] if arch == "llama" else None, init_lora_weights=False))
    return model


def test_base_is_frozen_and_only_the_active_adapter_trains():
    model = two_adapters()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    model.set_adapter("other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.other." in n for n in trainable)


def test_set_adapter_switches_outputs_without_reloading():
    model = two_adapters()
    batch = inputs("llama")
    a = output(model, batch)
    model.set_adapter("other")
    b = output(model, batch)
    model.set_adapter("default")
    assert not torch.allclose(a, b)
    assert torch.equal(output(model, batch), a)
    assert model.active_adapter == "default"


def test_unknown_adapter_names_list_the_known_ones():
    model = two_adapters()
    with pytest.raises(KeyError, match=r"No adapter named 'nope'; this model has \['default', 'other'\]"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="exists already"):
        model.add_adapter("other", LoraConfig())
    with pytest.raises(ValueError, match="not usable"):
        model.add_adapter("a.b", LoraConfig())


def test_disable_adapter_gives_the_base_and_restores_even_after_an_error():
    model = two_adapters()
    batch = inputs("llama")
    reference = output(build("llama"), batch)
    adapted = output(model, batch)
    with pytest.raises(RuntimeError, match="boom"):
        with model.disable_adapter():
            torch.testing.assert_close(output(model, batch), reference, rtol=0, atol=0)
            raise RuntimeError("boom")
    assert torch.equal(output(model, batch), adapted)


def test_merge_state_is_explicit():
    model = two_adapters()
    model.merge_adapter()
    for action in (lambda: model.set_adapter("other"), lambda: model.disable_adapter().__enter__(), model.unload,
                   lambda: model.delete_adapter("default"), lambda: model(**inputs("llama"), adapter_names=["default", "other"])):
        with pytest.raises(RuntimeError, match="merged"):
            action()
    model.unmerge_adapter()
    model.unmerge_adapter()  # idempotent
    model.set_adapter("other")


def test_delete_adapter_removes_its_layers_and_empty_hosts():
    model = two_adapters()
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj
    assert not isinstance(k_proj, AdapterHost)  # only "other" adapted k_proj
    model.delete_adapter("default")
    assert not any(isinstance(m, AdapterHost) for m in model.get_base_model().modules())
    assert model.active_adapter is None


def test_save_layout_default_at_top_others_in_subfolders_and_load_adapter(tmp_path):
    model = two_adapters()
    batch = inputs("llama")
    expected = {name: (model.set_adapter(name), output(model, batch))[1] for name in ("default", "other")}
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["inference_mode"] is True

    loaded = PeftModel.from_pretrained(build("llama"), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    for name, want in expected.items():
        loaded.set_adapter(name)
        assert torch.equal(output(loaded, batch), want)


def test_from_pretrained_is_trainable_on_request(tmp_path):
    model = get_peft_model(build("llama"), LoraConfig(r=4))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path, is_trainable=True)
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == model.get_nb_trainable_parameters()[0]


def test_mixed_batch_generate_equals_each_row_alone():
    model = two_adapters()
    batch = inputs("llama", batch=3)
    names = ["other", "__base__", "default"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        row = batch["input_ids"][i : i + 1]
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=row, **kwargs)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=row, **kwargs)
        assert torch.equal(mixed[i : i + 1], alone), name


def test_mixed_batch_generate_with_beams_on_an_encoder_decoder():
    model = get_peft_model(build("t5"), LoraConfig(r=4, init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=4, init_lora_weights=False))
    batch = inputs("t5", batch=2)
    kwargs = dict(max_new_tokens=5, num_beams=2, do_sample=False)
    mixed = model.generate(input_ids=batch["input_ids"], adapter_names=["other", "default"], **kwargs)
    model.set_adapter("other")
    first = model.generate(input_ids=batch["input_ids"][:1], **kwargs)
    assert torch.equal(mixed[:1, : first.shape[1]], first)


def test_mixed_batch_refuses_bad_names():
    model = two_adapters()
    batch = inputs("llama")
    with pytest.raises(KeyError, match="No adapter named 'x'"):
        model(**batch, adapter_names=["default", "x"])
    with pytest.raises(ValueError, match="2 entries but a layer received a batch of 3"):
        model(**inputs("llama", batch=3), adapter_names=["default", "other"])
    with pytest.raises(TypeError, match="one adapter name"):
        model(**batch, adapter_names="default")


def test_unload_after_several_adapters_restores_base_and_merge_and_unload_keeps_only_active():
    reference = build("llama")
    model = two_adapters()
    plain = model.unload()
    for (n, a), (_, b) in zip(reference.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), n
    model = two_adapters()
    batch = inputs("llama")
    model.set_adapter("other")
    want = output(model, batch)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterHost) for m in plain.modules())
    torch.testing.assert_close(output(plain, batch), want, rtol=1e-4, atol=1e-5)


def test_attributes_fall_through_to_the_base_model():
    model = get_peft_model(build("llama"), LoraConfig())
    assert model.config.model_type == "llama"
    assert model.device.type == "cpu"
    assert model.get_base_model() is model.base_model.model


def test_base_model_is_layered_as_in_peft():
    """Code written for peft reaches the transformers model as ``base_model.model`` and calls ``base_model(...)``."""
    model = get_peft_model(build("llama"), LoraConfig(init_lora_weights=False))
    assert type(model.base_model.model).__name__ == "LlamaForCausalLM"
    assert model.base_model.config is model.config  # attributes fall through every layer
    batch = inputs("llama")
    torch.testing.assert_close(model.base_model(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.startswith("base_model.model.model.") or n.startswith("base_model.model.lm_head.") for n in names)


def test_wrapping_a_peft_model_twice_is_refused():
    model = get_peft_model(build("llama"), LoraConfig())
    with pytest.raises(TypeError, match="already a PeftModel"):
        get_peft_model(model, LoraConfig())


def test_batched_mixed_lora_kernel_equals_the_per_group_loop_and_sees_weight_updates():
    model = get_peft_model(build("llama"), LoraConfig(r=4, init_lora_weights=False))
    for i in range(7):
        model.add_adapter(f"a{i}", LoraConfig(r=4, lora_alpha=4 + i, init_lora_weights=False))
    names = ["default", "__base__"] + [f"a{i}" for i in range(7)] + ["a3"]
    batch = inputs("llama", batch=len(names))
    with torch.no_grad():
        fast = model(**batch, adapter_names=names).logits  # batched gather + bmm
    with torch.enable_grad():
        slow = model(**batch, adapter_names=names).logits.detach()  # per-group loop
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)

    layer = model.base_model.model.model.layers[0].self_attn.q_proj.adapters["a3"]
    with torch.no_grad():
        layer.lora_B.weight.add_(1.0)  # the cached stack must notice
        updated = model(**batch, adapter_names=names).logits
    slow_updated = model(**batch, adapter_names=names).logits.detach()
    assert not torch.allclose(updated, fast)
    torch.testing.assert_close(updated, slow_updated, rtol=1e-5, atol=1e-5)


def test_adapters_follow_the_base_models_train_or_eval_mode(tmp_path):
    model = get_peft_model(build("llama").eval(), LoraConfig(r=4, lora_dropout=0.5))
    assert not any(m.training for m in model.modules())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("llama").eval(), tmp_path)
    assert not any(m.training for m in loaded.modules()), "dropout must be off for a model loaded in eval mode"
    model.train()
    assert all(m.training for m in model.modules())


def test_a_re_added_adapter_trains_after_set_adapter():
    model = two_adapters()
    model.delete_adapter("default")
    model.add_adapter("default", LoraConfig(r=4))
    model.set_adapter("default")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
