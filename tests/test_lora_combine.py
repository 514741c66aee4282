"""add_weighted_adapter: every combination type gives the same adapter as ``peft``'s on the same inputs
(the DARE types after the same ``torch.manual_seed``), and bad requests are refused with a reason."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import build, inputs, output
from parity import nudge

from peftkit import IA3Config, LoraConfig, get_peft_model
from peftkit.methods.lora_combine import COMBINATION_TYPES, combine

DENSITY = {k: 0.5 for k in COMBINATION_TYPES if k.split("_")[0] in ("ties", "dare", "magnitude")}
ADAPTERS = {
    "llama": ({"target_modules": ["q_proj", "v_proj"]}, {"target_modules": ["q_proj", "k_proj"], "lora_alpha": 16}),
    "gpt2": ({"target_modules": ["c_attn", "wte"]}, {"target_modules": ["c_attn"], "lora_alpha": 4}),
}


def two_adapters(arch: str, tmp_path, second_rank: int = 4):
    """The same two random LoRA adapters ("a", "b") in peftkit and in ``peft``."""
    first, second = ADAPTERS[arch]
    model = get_peft_model(build(arch), LoraConfig(r=4, init_lora_weights=False, **first), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=second_rank, init_lora_weights=False, **second))
    nudge(model._tuners["a"].model, seed=3)  # only the adapters' tensors (requires_grad) move
    model.set_adapter("b")
    nudge(model._tuners["b"].model, seed=4)
    model.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(build(arch), tmp_path / "a", adapter_name="a")
    reference.load_adapter(tmp_path / "b", adapter_name="b")
    return model, reference.eval()


@pytest.mark.parametrize("arch,kind", [("llama", k) for k in COMBINATION_TYPES] + [("gpt2", "svd"), ("gpt2", "cat"), ("gpt2", "dare_ties")])
def test_every_combination_type_matches_peft(arch, kind, tmp_path):
    model, reference = two_adapters(arch, tmp_path, second_rank=2 if kind in ("cat", "svd") else 4)
    options = dict(combination_type=kind, density=DENSITY.get(kind))
    torch.manual_seed(7)
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", **options)
    torch.manual_seed(7)
    reference.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", **options)

    ours = model._tuners["mix"].state_dict()
    theirs = peft.get_peft_model_state_dict(reference, adapter_name="mix")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(t.abs().sum() > 0 for t in ours.values())
    config, peft_config = model.peft_config["mix"], reference.peft_config["mix"]
    assert (config.r, config.lora_alpha) == (peft_config.r, peft_config.lora_alpha)
    assert set(config.target_modules) == set(peft_config.target_modules)
    assert not any(p.requires_grad for _, p in model._tuners["mix"].named_parameters())

    model.set_adapter("mix"), reference.set_adapter("mix")
    batch = inputs(arch)
    torch.testing.assert_close(output(model, batch), output(reference, batch), rtol=1e-5, atol=1e-5)


def test_cat_is_exactly_the_weighted_sum_of_the_updates(tmp_path):
    model, _ = two_adapters("llama", tmp_path, second_rank=2)
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type="cat")
    for path, layer in model._tuners["mix"].layers():
        host = model._tuners["mix"].model.get_submodule(path)
        want = sum(w * host.adapters[n].delta_weight() for n, w in (("a", 0.7), ("b", -0.4)) if n in host.adapters)
        torch.testing.assert_close(layer.delta_weight(), want, rtol=1e-5, atol=1e-6)


def test_dare_keeps_a_density_fraction_and_the_expectation():
    """The DARE drop, on its own statistics: about ``density`` of the entries survive, rescaled by 1/density,
    so the mean over many draws is the plain weighted sum."""
    torch.manual_seed(0)
    t = torch.randn(64, 64)
    one = combine("dare_linear", [t], torch.tensor([1.0]), density=0.3)
    kept = (one != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.03
    torch.testing.assert_close(one[one != 0], t[one != 0] / 0.3)
    mean = sum(combine("dare_linear", [t], torch.tensor([1.0]), density=0.3) for _ in range(400)) / 400
    assert (mean - t).abs().mean().item() < 0.1 * t.abs().mean().item()


def test_bad_requests_are_refused(tmp_path):
    model, _ = two_adapters("llama", tmp_path, second_rank=2)
    with pytest.raises(ValueError, match="one rank"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "mix", combination_type="linear")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["a", "b"], [1], "mix", combination_type="cat")
    with pytest.raises(ValueError, match="density"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "mix", combination_type="ties")
    with pytest.raises(ValueError, match="exists already"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "b", combination_type="cat")
    with pytest.raises(ValueError, match="svd_rank"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "mix", combination_type="svd", svd_rank=1000)
    assert "mix" not in model.peft_config  # a failed combination leaves nothing behind
    other = get_peft_model(build("llama"), IA3Config(), adapter_name="ia3")
    with pytest.raises(TypeError, match="only LoRA"):
        other.add_weighted_adapter(["ia3"], [1], "mix", combination_type="linear")


def test_merge_adapters_command_writes_the_combined_adapter(tmp_path):
    from tiny_pipeline import model_dir

    from peftkit import PeftModel
    from peftkit.cli import main

    base = model_dir(tmp_path)
    dirs = []
    for i, extra in enumerate(ADAPTERS["llama"]):
        model = get_peft_model(build("llama"), LoraConfig(r=4, init_lora_weights=False, base_model_name_or_path=base, **extra))
        nudge(model, seed=i)
        model.save_pretrained(tmp_path / f"task{i}")
        dirs.append(tmp_path / f"task{i}")
    out = tmp_path / "both"
    args = ["merge-adapters", "--adapter", str(dirs[0]), "--adapter", str(dirs[1]), "--weights", "0.7,-0.4",
            "--combination-type", "dare_ties", "--density", "0.5", "--seed", "3", "--output", str(out)]
    assert main(args) == 0
    combined = PeftModel.from_pretrained(build("llama"), out)

    model = PeftModel.from_pretrained(build("llama"), dirs[0], adapter_name="a")
    model.load_adapter(dirs[1], adapter_name="b")
    torch.manual_seed(3)
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type="dare_ties", density=0.5)
    model.set_adapter("mix")
    torch.testing.assert_close(output(combined, inputs("llama")), output(model, inputs("llama")))
    assert main(args) == 2  # the output exists: refused, nothing overwritten
    bad = [*args[:-1], str(tmp_path / "other")]
    bad[6] = "1"
    assert main(bad) == 2 and not (tmp_path / "other").exists()  # one weight for two adapters
