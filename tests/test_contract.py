"""The contract every registered method keeps, on tiny T5, BART, GPT-2, Llama and BERT models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, assert_mixed_rows_match_alone, build, inputs, output
from method_cases import CASES

from peftkit import PeftModel, get_peft_model
from peftkit.registry import registered_peft_types

CASE_ARCHS = [(case, arch) for case in CASES for arch in ARCHS]


def make(case: str, arch: str, seed: int = 0):
    config = CASES[case].build(arch)
    if config is None:
        pytest.skip(f"{case} does not apply to {arch}")
    return get_peft_model(build(arch, seed), config)


def perturb(model: PeftModel, seed: int = 3) -> None:
    """Give every trainable tensor a random nudge, so the adapter is no longer a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def loss_of(model, batch):
    out = model(**batch)
    if getattr(out, "loss", None) is not None:
        return out.loss
    hidden = out.last_hidden_state  # an encoder: regress onto a fixed random target
    target = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    loss = (hidden - target).pow(2).mean()
    pooled = getattr(out, "pooler_output", None)  # BERT's pooler is a layer too: every parameter must reach the loss
    return loss if pooled is None else loss + (pooled - 0.5).pow(2).mean()


def test_every_registered_method_has_a_case():
    covered = {case.peft_type for case in CASES.values()}
    assert set(registered_peft_types()) <= covered, f"methods without a contract case: {set(registered_peft_types()) - covered}"


@pytest.mark.parametrize("case,arch", CASE_ARCHS)
def test_fresh_adapter_is_a_noop_where_promised(case, arch):
    if not CASES[case].noop_at_init:
        pytest.skip("this method does not start as a no-op")
    batch = inputs(arch)
    reference = output(build(arch), batch)
    model = make(case, arch)
    torch.testing.assert_close(output(model, batch), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case,arch", CASE_ARCHS)
def test_only_adapter_parameters_train_and_base_stays_bit_identical(case, arch):
    model = make(case, arch)
    tuner = model._tuners["default"]
    own = {id(p) for _, p in tuner.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable and trainable == own
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in own}

    batch = inputs(arch)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, moved = [], set()
    for _ in range(6):
        loss = loss_of(model, batch)
        loss.backward()
        for n, p in model.named_parameters():
            if id(p) in own:
                moved |= {n} if p.grad is not None and p.grad.abs().sum() > 0 else set()
            else:
                assert p.grad is None, f"frozen parameter {n} got a gradient"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"loss did not go down: {losses}"
    # Every adapter parameter gets a real gradient (LoRA's A only once B has moved off zero, hence several steps).
    never = sorted(n for n, p in model.named_parameters() if id(p) in own and n not in moved)
    assert not never, f"adapter parameters that never got a gradient: {never}"
    # Methods that train base weights (selective, full) name them as their own, so this holds for all.
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen parameter {n} changed"


@pytest.mark.parametrize("case,arch", CASE_ARCHS)
def test_save_load_round_trip_gives_identical_outputs(case, arch, tmp_path):
    model = make(case, arch)
    perturb(model)
    batch = inputs(arch)
    expected = output(model, batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(build(arch), tmp_path)
    assert torch.equal(output(loaded, batch), expected)
    assert not any(p.requires_grad for p in loaded.parameters()), "from_pretrained must load frozen by default"


@pytest.mark.parametrize("case,arch", CASE_ARCHS)
def test_generate_works(case, arch):
    if not ARCHS[arch].lm:
        pytest.skip("no LM head")
    model = make(case, arch)
    perturb(model)
    batch = inputs(arch)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] >= 2


@pytest.mark.parametrize("case,arch", CASE_ARCHS)
def test_merge_is_exact_idempotent_and_reversible(case, arch):
    model = make(case, arch)
    if not model._tuners["default"].mergeable:
        with pytest.raises(TypeError):
            model.merge_adapter()
        return
    perturb(model)
    batch = inputs(arch)
    unmerged = output(model, batch)
    model.merge_adapter()
    merged = output(model, batch)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    model.merge_adapter()  # second call changes nothing
    torch.testing.assert_close(output(model, batch), merged, rtol=0, atol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(output(model, batch), unmerged, rtol=1e-4, atol=1e-4)
    n_base = sum(p.numel() for p in build(arch).parameters())
    plain = model.merge_and_unload()
    assert type(plain) is type(build(arch))
    assert sum(p.numel() for p in plain.parameters()) == n_base
    torch.testing.assert_close(output(plain, batch), unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case,arch", CASE_ARCHS)
def test_unload_restores_the_base_bit_for_bit(case, arch):
    reference = build(arch)
    model = make(case, arch)
    perturb(model)
    if not CASES[case].restores_base:
        # A method that keeps no copy of the base weights must refuse, not hand back trained weights.
        batch = inputs(arch)
        before = output(model, batch)
        with pytest.raises(RuntimeError, match="original weights"):
            model.unload()
        assert torch.equal(output(model, batch), before), "a refused unload() must leave the model as it was"
        return
    plain = model.unload()
    assert type(plain) is type(reference)
    ref_state, state = reference.state_dict(), plain.state_dict()
    assert ref_state.keys() == state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], state[key]), key
    assert all(p.requires_grad for p in plain.parameters()), "unload must restore requires_grad"


@pytest.mark.parametrize("case,arch", CASE_ARCHS)
def test_mixed_batch_equals_each_row_alone(case, arch):
    model = make(case, arch)
    if not model._tuners["default"].mixed_batch:
        pytest.skip("method cannot share a batch")
    perturb(model)
    model.add_adapter("other", copy.deepcopy(CASES[case].build(arch)))
    model.set_adapter("other")
    perturb(model, seed=7)
    model.set_adapter("default")
    batch = inputs(arch, batch=3)
    names = ["default", "other", "__base__"]
    assert_mixed_rows_match_alone(model, batch, names, tol=1e-4)
