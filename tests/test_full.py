"""Full fine-tuning through get_peft_model: everything trains, nothing is copied, and the operations
that would need the original weights refuse once those weights have changed."""

from __future__ import annotations

import pytest
import torch
from conftest import build, inputs, output
from parity import nudge
from safetensors.torch import load_file
from test_contract import loss_of

from peftkit import FullConfig, IA3Config, PeftModel, get_peft_model
from peftkit.presets import MethodOptions, build_config, get_preset


def step(model, arch: str) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss_of(model, inputs(arch)).backward()
    optimizer.step()


def test_every_parameter_trains_and_none_is_copied():
    base = build("gpt2")
    ids = {id(p) for p in base.parameters()}
    model = get_peft_model(base, FullConfig())
    assert all(p.requires_grad for p in model.parameters())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == total == sum(p.numel() for p in build("gpt2").parameters())
    own = model._tuners["default"].named_parameters()
    assert {id(p) for _, p in own} == ids  # the model's own tensors, no second copy
    tensors_held = [v for v in vars(model._tuners["default"]).values() if isinstance(v, torch.Tensor)]
    assert not tensors_held


def test_saved_file_is_the_whole_model_with_tied_weights_once(tmp_path):
    model = get_peft_model(build("gpt2"), FullConfig())
    step(model, "gpt2")
    model.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {"base_model.model." + n for n, _ in build("gpt2").named_parameters()}
    assert "base_model.model.lm_head.weight" not in keys  # tied to transformer.wte.weight
    loaded = PeftModel.from_pretrained(build("gpt2"), tmp_path)
    assert torch.equal(output(loaded, inputs("gpt2")), output(model, inputs("gpt2")))


def test_unload_and_disable_work_until_a_weight_changes_then_refuse():
    model = get_peft_model(build("llama"), FullConfig())
    with model.disable_adapter():
        pass
    step(model, "llama")
    batch = inputs("llama")
    trained = output(model, batch)
    with pytest.raises(RuntimeError, match=r"disable_adapter\(\) needs the base model's original weights"):
        with model.disable_adapter():
            pass
    assert model.routing.enabled
    with pytest.raises(RuntimeError, match="keeps no copy"):
        model.unload()
    with pytest.raises(RuntimeError, match="keeps no copy"):
        model.delete_adapter("default")
    assert torch.equal(output(model, batch), trained)

    plain = model.merge_and_unload()
    assert plain is model.base_model.model and type(plain).__name__ == "LlamaForCausalLM"
    assert torch.equal(output(plain, batch), trained)


def test_unload_of_an_untouched_model_returns_it():
    model = get_peft_model(build("t5"), FullConfig())
    plain = model.unload()
    reference = build("t5").state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in plain.state_dict().items())


def test_a_failed_load_reports_its_own_error_and_leaves_the_base_untouched(tmp_path):
    model = get_peft_model(build("gpt2"), FullConfig())
    model.save_pretrained(tmp_path)
    base = build("llama")
    before = {n: p.clone() for n, p in base.named_parameters()}
    with pytest.raises(KeyError, match="must hold every parameter"):
        PeftModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


def test_cannot_share_the_model_with_another_adapter():
    model = get_peft_model(build("llama"), FullConfig())
    with pytest.raises(ValueError, match="cannot share a model"):
        model.add_adapter("ia3", IA3Config())
    model = get_peft_model(build("llama"), IA3Config())
    with pytest.raises(ValueError, match="FullConfig cannot share a model"):
        model.add_adapter("full", FullConfig())


def test_preset():
    preset = get_preset("full")
    assert preset.saves_full_model and not preset.uses
    assert isinstance(build_config("full", MethodOptions()), FullConfig)
    with pytest.raises(ValueError, match="does not use option"):
        build_config("full", MethodOptions(rank=16))


def test_loaded_for_inference_is_frozen_and_trainable_on_request(tmp_path):
    model = get_peft_model(build("bart"), FullConfig())
    nudge(model, scale=0.01)
    model.save_pretrained(tmp_path)
    assert not any(p.requires_grad for p in PeftModel.from_pretrained(build("bart"), tmp_path).parameters())
    assert all(p.requires_grad for p in PeftModel.from_pretrained(build("bart"), tmp_path, is_trainable=True).parameters())


def test_saving_copies_only_tensors_that_share_memory(tmp_path):
    """save_tensors no longer clones every tensor (a whole model for full fine-tuning); tensors that
    share storage or are not contiguous must still be written correctly."""
    from peftkit.io.files import save_tensors

    t = torch.arange(12.0).reshape(3, 4)
    tensors = {"rows": t[1:], "whole": t, "same": t, "transposed": t.T, "alone": torch.ones(2)}
    save_tensors(tmp_path / "x.safetensors", tensors)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
