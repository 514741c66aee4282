"""peft's names in peftkit: Auto classes, state-dict functions, TaskType, push_to_hub, base model names,
and the vLLM check (save_pretrained warning, ``peftkit check``)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import build, inputs

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model, hub
from peftkit.cli import main
from peftkit.io.vllm import VllmCompatibilityWarning


def trained_lora(**kw) -> PeftModel:
    return get_peft_model(build("llama"), LoraConfig(**{"r": 4, "init_lora_weights": False, **kw})).eval()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_auto_classes_of_peft_and_peftkit_load_an_adapter_of_a_local_model_from_another_directory(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    build("llama").save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    base = transformers.AutoModelForCausalLM.from_pretrained("base")  # a relative path, as users type it
    model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False)).eval()
    model.save_pretrained("adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((tmp_path / "base").resolve())

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    batch = inputs("llama")
    want = logits(model, batch)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    ours = peftkit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(ours, PeftModel) and not ours.training
    torch.testing.assert_close(logits(theirs, batch), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(ours, batch), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
        peftkit.AutoPeftModelForSeq2SeqLM.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
        peftkit.AutoPeftModel.from_pretrained(tmp_path / "adapter")


def test_catalogue_models_are_recorded_by_their_hugging_face_id_and_resolved_offline(monkeypatch):
    entry = hub.CATALOGUE[hub.DEFAULT_MODEL]
    assert entry.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub.recorded_name(hub.DEFAULT_MODEL) == hub.recorded_name(entry.hub_id) == entry.hub_id
    asked = []
    monkeypatch.setattr(hub, "ensure_cached", lambda name, quiet=False: asked.append(name) or f"/cache/{name}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_model(entry.hub_id) == f"/cache/{hub.DEFAULT_MODEL}" and asked == [hub.DEFAULT_MODEL]


def test_state_dict_functions_and_inject_match_peft(tmp_path):
    peft = pytest.importorskip("peft")
    ours = trained_lora()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path))
    mine, reference = peftkit.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert mine.keys() == reference.keys()
    assert all(torch.equal(mine[k], reference[k]) for k in mine)

    injected = peftkit.inject_adapter_in_model(LoraConfig(r=4), build("llama"), state_dict=reference)
    assert type(injected).__name__ == "LlamaForCausalLM"
    batch = inputs("llama")
    torch.testing.assert_close(logits(injected.eval(), batch), logits(ours, batch), rtol=0, atol=0)
    assert {n for n, p in injected.named_parameters() if p.requires_grad} == {
        n for n, _ in injected.named_parameters() if ".adapters.default.lora_" in n}

    fresh = get_peft_model(build("llama"), LoraConfig(r=4)).eval()
    result = peftkit.set_peft_model_state_dict(fresh, mine)
    assert result.unexpected_keys == [] and result.missing_keys == []
    torch.testing.assert_close(logits(fresh, batch), logits(ours, batch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        peftkit.set_peft_model_state_dict(get_peft_model(build("llama"), LoraConfig(r=2)), mine)


def test_task_type_has_peft_names_and_values():
    peft = pytest.importorskip("peft")
    assert {t.name: t.value for t in peftkit.TaskType} == {t.name: t.value for t in peft.TaskType}
    config = LoraConfig(task_type=peftkit.TaskType.CAUSAL_LM)
    assert config.task_type == "CAUSAL_LM" and json.loads(config.to_json())["task_type"] == "CAUSAL_LM"


def test_push_to_hub_uploads_the_adapter_files_only(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    class Repo:
        repo_id = "someone/my-adapter"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        from pathlib import Path

        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        calls.append((repo_id, files, json.loads((Path(folder_path) / "adapter_config.json").read_text()), kw))
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: Repo())
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = trained_lora()
    model.add_adapter("other", LoraConfig(r=2))
    assert model.push_to_hub("my-adapter", commit_message="first") == "commit"
    (repo_id, files, config, kw), = calls
    assert repo_id == "someone/my-adapter" and kw["commit_message"] == "first"
    assert files == ["adapter_config.json", "adapter_model.safetensors",
                     "other/adapter_config.json", "other/adapter_model.safetensors"]
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True


@pytest.mark.parametrize("options,reason", [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="all"), "bias"),
])
def test_save_warns_when_vllm_will_not_load_the_adapter_and_check_says_why(tmp_path, capsys, options, reason):
    with pytest.warns(VllmCompatibilityWarning, match=reason):
        trained_lora(**options).save_pretrained(tmp_path / "refused")
    assert main(["check", "--adapter", str(tmp_path / "refused")]) == 1
    assert reason in capsys.readouterr().out

    with warnings.catch_warnings():
        warnings.simplefilter("error", VllmCompatibilityWarning)
        trained_lora().save_pretrained(tmp_path / "fine")
    assert main(["check", "--adapter", str(tmp_path / "fine")]) == 0
    assert "vLLM: loads" in capsys.readouterr().out


LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
KEYS = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]


@pytest.mark.parametrize("change,keys,refused", [
    # Each rule of vLLM's PEFTHelper / LoRA loader (see peftkit/io/vllm.py for the source files).
    ({"peft_type": "IA3"}, [], "LoRA adapters only"),
    ({"use_dora": True}, ["x.q_proj.lora_magnitude_vector"], "DoRA"),
    ({"modules_to_save": ["lm_head"]}, ["base_model.model.lm_head.weight"], "modules_to_save=['lm_head']"),
    ({"modules_to_save": ["embed_tokens", "score"]}, [], "modules_to_save=['embed_tokens']"),
    ({"bias": "lora_only"}, ["base_model.model.model.layers.0.self_attn.q_proj.bias"], "bias='lora_only'"),
    ({"lora_bias": True}, [], "LoRA bias"),
    ({"init_lora_weights": "pissa"}, [], "init_lora_weights='pissa'"),
    ({"init_lora_weights": "olora"}, [], "changes the base weights"),
    ({"layer_replication": [[0, 2]]}, [], "layer_replication"),
    ({"use_qalora": True}, [], "QALoRA"),
    ({"r": 1024}, [], "up to 512"),
    ({"rank_pattern": {"q_proj": 600}}, [], "rank 600"),
    ({}, ["base_model.model.model.norm.weight"], "not read as LoRA matrices: base_model.model.model.norm.weight"),
])
def test_each_vllm_rule_refuses_what_vllm_refuses(change, keys, refused):
    from peftkit.io.vllm import vllm_problems

    problems = vllm_problems({**LORA, **change}, KEYS + keys)
    assert len(problems) == 1 and refused in problems[0], problems


@pytest.mark.parametrize("change,keys,note", [
    # Loaded by vLLM: these options are supported, some with a condition on how vLLM is started.
    ({}, [], None),
    ({"use_rslora": True}, [], None),  # vLLM scales by alpha / sqrt(r) itself
    ({"init_lora_weights": "gaussian"}, [], None),
    ({"r": 16}, [], None),  # vLLM's default --max-lora-rank
    ({"r": 17}, [], "--max-lora-rank 32"),
    ({"rank_pattern": {"v_proj": 64}}, [], "--max-lora-rank 64"),
    ({"modules_to_save": ["score"], "task_type": "SEQ_CLS"}, ["base_model.model.score.weight"], "classification head"),
    ({"target_modules": ["q_proj", "lm_head"]}, ["base_model.model.lm_head.lora_A.weight"], "LoRA on lm_head"),
    ({"target_modules": ["embed_tokens"]}, ["base_model.model.model.embed_tokens.lora_embedding_A"], "embed_tokens"),
])
def test_what_vllm_loads_is_not_refused_and_conditions_are_named(change, keys, note):
    from peftkit.io.vllm import vllm_notes, vllm_problems

    config = {**LORA, **change}
    assert vllm_problems(config, KEYS + keys) == []
    notes = vllm_notes(config, KEYS + keys)
    assert (notes == []) if note is None else any(note in n for n in notes), notes


def test_lora_on_the_output_head_saves_without_a_vllm_warning_and_check_names_the_condition(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error", VllmCompatibilityWarning)
        trained_lora(target_modules=["q_proj", "lm_head"], r=32).save_pretrained(tmp_path / "head")
    assert main(["check", "--adapter", str(tmp_path / "head")]) == 0
    out = capsys.readouterr().out
    assert "vLLM: loads" in out and "--max-lora-rank 32" in out and "LoRA on lm_head" in out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_all_linear_never_targets_the_output_head(arch):
    model = get_peft_model(build(arch), LoraConfig(target_modules="all-linear"))
    keys = model._tuner("default").state_dict()
    assert keys and not any(".lm_head." in k for k in keys)
