"""Adapters and configs that cannot be right are refused before they touch the model: weights holding
NaN/inf or integers, patterns that are not regular expressions, ranks no layer can take."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build
from peftkit import BottleneckConfig, IA3Config, LoraConfig, PeftModel, get_peft_model


def fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture()
def saved(tmp_path):
    model = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "good")
    return tmp_path


def spoil(src, dst, change) -> None:
    (dst).mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = change(tensors[key])
    save_file(tensors, str(dst / "adapter_model.safetensors"))


def _nan(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[0] = float("-inf")
    return t


@pytest.mark.parametrize(
    "name, change, expected",
    [
        ("nan", _nan, r"holds 1 NaN/inf value\(s\) of \d+; .*check_values=False"),
        ("inf", _inf, r"holds 1 NaN/inf value\(s\)"),
        ("int", lambda t: t.round().to(torch.int64), r"holds int64 values; adapter weights are floating point"),
    ],
)
def test_adapter_weights_with_nan_inf_or_integers_are_refused_unless_asked(saved, name, change, expected):
    spoil(saved / "good", saved / name, change)
    base = build("llama")
    before = fingerprint(base)
    with pytest.raises(ValueError, match=expected):
        PeftModel.from_pretrained(base, saved / name)
    assert fingerprint(base) == before
    peft_model = PeftModel.from_pretrained(build("llama"), saved / "good")
    with pytest.raises(ValueError, match=expected):
        peft_model.load_adapter(saved / name, "other")
    assert "other" not in peft_model.peft_config
    loaded = PeftModel.from_pretrained(build("llama"), saved / name, check_values=False)  # the explicit opt-out
    assert loaded.peft_config["default"].r == 2


def test_cli_refuses_nan_adapters_and_names_the_opt_out(saved, tmp_path, capsys):
    import tiny_pipeline as tiny
    from peftkit.cli import main
    from peftkit.hub import load_model

    model_dir = tiny.model_dir(tmp_path, "llama")
    get_peft_model(load_model(model_dir)[0], LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    spoil(tmp_path / "a", tmp_path / "nan", _nan)
    args = ["merge", "--model", model_dir, "--adapter", str(tmp_path / "nan"), "--output", str(tmp_path / "m")]
    assert main(args) == 2
    assert "NaN/inf" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main([*args, "--no-check-values"]) == 0


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: LoraConfig(target_modules="q_proj(("), r"LoraConfig: target_modules: 'q_proj\(\(' is not a valid regular expression"),
        (lambda: LoraConfig(target_modules=["q_proj"], exclude_modules="[v"), r"LoraConfig: exclude_modules: '\[v' is not a valid"),
        (lambda: LoraConfig(rank_pattern={"q_proj)": 4}), r"LoraConfig: rank_pattern key: 'q_proj\)' is not a valid"),
        (lambda: LoraConfig(alpha_pattern={"*": 4}), r"LoraConfig: alpha_pattern key: '\*' is not a valid"),
        (lambda: IA3Config(target_modules="(k|v"), r"IA3Config: target_modules: '\(k\|v' is not a valid"),
        (lambda: BottleneckConfig(target_modules="mlp["), r"BottleneckConfig: target_modules: 'mlp\[' is not a valid"),
    ],
)
def test_invalid_regex_is_a_value_error_when_the_config_is_made(make, expected):
    with pytest.raises(ValueError, match=expected):
        make()


def test_a_rank_no_layer_can_take_is_refused_before_anything_is_allocated(monkeypatch):
    from peftkit.methods import lora

    base = build("llama")  # q_proj: 32 -> 32, v_proj: 32 -> 16
    before = fingerprint(base)
    made = []
    real = lora.LoraTuner.make_layer
    monkeypatch.setattr(lora.LoraTuner, "make_layer", lambda self, m, p: made.append(p) or real(self, m, p))
    for config in (LoraConfig(r=10**9, target_modules=["q_proj"]),
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 17})):
        with pytest.raises(ValueError, match=r"LoraConfig: r=\d+ is more than .*(q|v)_proj \(Linear, input 32, output (32|16)\) allows"):
            get_peft_model(base, config)
    assert made == [] and fingerprint(base) == before
    assert get_peft_model(base, LoraConfig(r=16, target_modules=["v_proj"])).peft_config["default"].r == 16  # the limit itself
