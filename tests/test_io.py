"""The Hugging Face PEFT file format: key maps, atomic writes, and loads that fail cleanly."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import build, inputs, output
from safetensors.torch import load_file, save_file

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.inject import AdapterHost
from peftkit.io.files import atomic_write, save_tensors
from peftkit.io.keys import from_hf_key, to_hf_key


def test_key_maps_are_inverse_pure_functions():
    key = to_hf_key("model.layers.0.self_attn.q_proj", "lora_A.weight")
    assert key == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert from_hf_key(key) == "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert to_hf_key("", "prompt") == "base_model.model.prompt"
    with pytest.raises(KeyError, match="does not start with"):
        from_hf_key("model.layers.0.q_proj.lora_A.weight")


def test_saved_keys_drop_the_adapter_name(tmp_path):
    model = get_peft_model(build("llama"), LoraConfig(r=4))
    model.add_adapter("second", LoraConfig(r=2))
    model.save_pretrained(tmp_path)
    for folder in (tmp_path, tmp_path / "second"):
        keys = set(load_file(folder / "adapter_model.safetensors"))
        assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
        assert not any("default" in k or "second" in k or "adapters" in k for k in keys)


def test_atomic_write_leaves_nothing_behind_when_interrupted(tmp_path):
    target = tmp_path / "adapter_model.safetensors"
    save_tensors(target, {"a": torch.ones(2)})

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert sorted(os.listdir(tmp_path)) == ["adapter_model.safetensors"]
    assert torch.equal(load_file(target)["a"], torch.ones(2))  # the previous file is intact


@pytest.fixture
def saved(tmp_path):
    model = get_peft_model(build("llama"), LoraConfig(r=4, init_lora_weights=False))
    model.save_pretrained(tmp_path)
    return tmp_path


def untouched(model) -> bool:
    reference = build("llama")
    return not any(isinstance(m, AdapterHost) for m in model.modules()) and all(
        torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values())
    )


def test_missing_directory_or_files_are_clear_errors(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PeftModel.from_pretrained(build("llama"), tmp_path / "nope")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        PeftModel.from_pretrained(build("llama"), saved)


def test_pickle_adapters_are_refused(saved):
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle, which peftkit does not load"):
        PeftModel.from_pretrained(build("llama"), saved)


def test_malformed_config_is_a_clear_error(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        PeftModel.from_pretrained(build("llama"), saved)
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "MAGIC"}))
    with pytest.raises(ValueError, match="Unknown peft_type 'MAGIC'"):
        PeftModel.from_pretrained(build("llama"), saved)
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0}))
    with pytest.raises(ValueError, match="r must be an integer"):
        PeftModel.from_pretrained(build("llama"), saved)


def test_options_peftkit_cannot_honour_are_refused_not_ignored(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config.update({"use_qalora": False, "qalora_group_size": 16, "megatron_config": None, "layers_to_transform": [0]})
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not support layers_to_transform=\[0\]"):
        PeftModel.from_pretrained(build("llama"), saved)


def test_wrong_shape_names_key_shapes_and_cause_and_loads_nothing(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(99, 4)
    save_file(tensors, saved / "adapter_model.safetensors")
    model = build("llama")
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(model, saved)
    assert key in str(err.value) and "(99, 4)" in str(err.value) and "(16, 4)" in str(err.value)
    assert "different base model" in str(err.value)
    assert untouched(model)


def test_unknown_and_missing_keys_are_errors_and_load_adapter_rolls_back(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, saved / "adapter_model.safetensors")
    with pytest.raises(KeyError, match="matches no module this adapter targets"):
        PeftModel.from_pretrained(build("llama"), saved)

    del tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"]
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    save_file(tensors, saved / "adapter_model.safetensors")
    model = get_peft_model(build("llama"), LoraConfig(r=4, init_lora_weights=False))
    before = output(model, inputs("llama"))
    with pytest.raises(KeyError, match="missing 1 tensor"):
        model.load_adapter(saved, adapter_name="broken")
    assert list(model.peft_config) == ["default"]
    assert torch.equal(output(model, inputs("llama")), before)


def test_save_into_a_file_path_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        get_peft_model(build("llama"), LoraConfig()).save_pretrained(tmp_path / "file")
