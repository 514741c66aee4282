"""Adding a method takes one file's worth of code and one ``register`` call: the command line (flags and
``--help``), YAML files, ``--set``, ``peftkit methods``, training and saving all pick it up with no other edit.

The method below lives only in this test (a trained vector added to each target's output, scaled by
``shift_scale``); nothing in peftkit knows its name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tiny_pipeline as tiny
from peftkit.cli import main
from peftkit.config import PeftConfig
from peftkit.methods.base import AdapterLayer, LayerTuner
from peftkit.registry import Preset, register, unregister
from peftkit.train import build_train_config


# --- the whole method: a config, a layer, a tuner, one registration ----------------------------------------
@dataclass
class ShiftConfig(PeftConfig):
    """A trained shift of each target's output.

    Args:
        shift_scale: Multiplies the trained shift.
        target_modules: Modules whose output is shifted.
        exclude_modules: Modules left alone.
        modules_to_save: Modules trained in full.
    """

    peft_type: ClassVar[str] = "SHIFT"

    shift_scale: float = 1.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.shift_scale > 0:
            raise ValueError(f"ShiftConfig: shift_scale must be > 0, got {self.shift_scale!r}.")


class Shift(AdapterLayer):
    additive = True

    def __init__(self, out_features: int, scale: float) -> None:
        super().__init__()
        self.shift, self.scale = nn.Parameter(torch.zeros(out_features)), scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (self.scale * self.shift).expand(*x.shape[:-1], -1)


class ShiftTuner(LayerTuner):
    supported = (nn.Linear,)
    default_targets = {"llama": ["q_proj"]}

    def make_layer(self, module: nn.Module, path: str) -> AdapterLayer:
        return Shift(module.out_features, self.config.shift_scale)


def register_shift() -> None:
    register(ShiftConfig, ShiftTuner, Preset("shift", "a trained shift of each target's output", default_lr=3e-3))


# --- what the one registration gives ------------------------------------------------------------------------
@pytest.fixture
def shift_method():
    register_shift()
    try:
        yield
    finally:
        unregister(ShiftConfig)


def test_a_new_method_is_everywhere_after_one_registration(shift_method, tmp_path, capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    line = next(line for line in listing.splitlines() if line.startswith("shift "))
    assert "0.003" in line and "a trained shift" in line
    assert "ShiftConfig (peft_type SHIFT); options: shift_scale=1.0, target_modules=None" in " ".join(listing.split())

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--shift-scale" in help_text and "Multiplies the trained shift. Methods: shift. (default: 1.0)" in help_text

    # YAML, --set and a flag fill ShiftConfig directly, by its field names (later wins, as for every setting).
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("method: shift\nshift:\n  shift_scale: 2\n")
    assert build_train_config(str(yaml_file)).method_config() == ShiftConfig(shift_scale=2.0)
    assert build_train_config(str(yaml_file), ["shift.shift_scale=3"]).method_config().shift_scale == 3.0
    with pytest.raises(ValueError, match="ShiftConfig: shift_scale must be > 0"):
        build_train_config(sets=["method=shift", "shift_scale=0"])

    # Train and save through the command line; the adapter file holds the new config and its tensors.
    work = tmp_path / "work"
    work.mkdir()
    model = tiny.model_dir(work, "llama")
    data = tiny.write_jsonl(work / "train.jsonl", tiny.dialogue_rows(8, seed=0))
    out = tmp_path / "out"
    assert main(["train", "--model", model, "--data", data, "--output", str(out), "--method", "shift", "--shift-scale", "2",
                 "--max-steps", "1", "--batch-size", "4", "--precision", "fp32", "--max-source-tokens", "48"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["shift_scale"]) == ("SHIFT", 2.0)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(tensors) == [f"base_model.model.model.layers.{i}.self_attn.q_proj.shift" for i in (0, 1)]
    assert all(t.abs().max() > 0 for t in tensors.values())  # it trained
    assert json.loads((out / "run.json").read_text())["lr"] == 3e-3  # the preset's default learning rate


def test_the_method_is_gone_after_unregister(capsys):
    register_shift()
    unregister(ShiftConfig)
    with pytest.raises(SystemExit):
        main(["train", "--data", "d.jsonl", "--output", "o", "--method", "shift"])
    assert "invalid choice: 'shift'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown method 'shift'"):
        build_train_config(sets=["method=shift"])
