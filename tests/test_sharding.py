"""Sharded training (FSDP2, 2 processes over gloo on the CPU) against one process: the saved adapter and
the saved full model are gathered whole and equal the unsharded run's; each process keeps half the weights
and optimizer state; a run killed after a sharded checkpoint resumes to the same adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_pipeline as tiny
from peftkit.data import PromptFormat
from peftkit.train import TrainConfig, train
from peftkit.train.sharding import resolve_sharding

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-5  # fp32; the two processes add gradient halves in another order than one process (seen: < 1e-6)
LORA = {"max_steps": 6, "save_every": 3, "keep_checkpoints": 2, "lr": 1e-2, "precision": "fp32", "log_every": 1,
        "method_options": {"lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}  # no dropout: one process draws other masks
FULL = {"max_steps": 3, "lr": 1e-3, "precision": "fp32", "method": "full"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The sharded runs (one launch of 2 processes, tests/fsdp_runs.py) and their one-process twins."""
    root = tmp_path_factory.mktemp("sharding")
    common = {"model": tiny.model_dir(root, "llama"), "data": tiny.write_jsonl(root / "train.jsonl", tiny.dialogue_rows(32, seed=0)),
              "format": {"max_source_tokens": 48}}
    # A global batch of 4: 2 per process sharded, 4 in the single process.
    lora, full = {**common, **LORA, "batch_size": 2, "sharding": "fsdp"}, {**common, **FULL, "batch_size": 2, "sharding": "fsdp"}
    settings = root / "settings.json"
    settings.write_text(json.dumps({"root": str(root), "lora": lora, "full": full}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29100 + os.getpid() % 300),
         str(HERE / "fsdp_runs.py"), str(settings)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for name, fields in (("single-lora", LORA), ("single-full", FULL)):
        merged = {**common, **fields, "batch_size": 4}
        train(TrainConfig(**{**merged, "format": PromptFormat(**merged["format"]), "output": str(root / name)}))
    return root


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "train_log.jsonl").read_text().splitlines() if "loss" in line]


def test_the_gathered_adapter_equals_one_process_adapter(runs):
    single, sharded = adapter(runs / "single-lora"), adapter(runs / "lora")
    assert sharded.keys() == single.keys() and len(single) == 8  # q_proj and v_proj, A and B, 2 layers
    for key in single:
        assert sharded[key].shape == single[key].shape, key  # whole tensors, not one process's half
        torch.testing.assert_close(sharded[key], single[key], rtol=0, atol=TOLERANCE, msg=key)
    assert max(single[k].abs().max().item() for k in single if "lora_B" in k) > 1e-2  # it trained (B starts at 0)
    assert losses(runs / "lora") == pytest.approx(losses(runs / "single-lora"), abs=1e-5)
    run = json.loads((runs / "lora" / "run.json").read_text())
    assert run["config"]["sharding"] == "fsdp" and run["processes"] == 2


def test_each_process_keeps_half_of_the_weights_and_optimizer_state_of_the_adapter_only(runs):
    single = json.loads((runs / "single-lora" / "run.json").read_text())
    sharded = json.loads((runs / "lora" / "run.json").read_text())
    assert sharded["parameter_mb_per_process"] < 0.6 * single["parameter_mb_per_process"]
    checkpoint = runs / "lora" / "checkpoints" / "step-00000006"  # the last step: its pieces make up the saved adapter
    whole = adapter(runs / "lora")
    pieces = [{k.replace(".adapters.default", ""): t for k, t in load_file(str(checkpoint / f"trainable-{rank}.safetensors")).items()}
              for rank in (0, 1)]
    for key, tensor in whole.items():  # each process holds half the rows of each adapter tensor, and only those
        assert pieces[0][key].shape[0] == pieces[1][key].shape[0] == tensor.shape[0] // 2
        assert torch.equal(torch.cat([pieces[0][key], pieces[1][key]]), tensor), key
    assert all(piece.keys() == whole.keys() for piece in pieces)
    for rank in (0, 1):
        moments = load_file(str(checkpoint / f"optimizer-{rank}.safetensors"))
        exp_avg = [t for k, t in moments.items() if k.endswith(".exp_avg")]
        assert len(exp_avg) == len(whole)  # AdamW state for the adapter's tensors only, none for the frozen base
        assert 2 * sum(t.numel() for t in exp_avg) == sum(t.numel() for t in whole.values())
    assert not (checkpoint / "trainable.safetensors").exists()


def test_a_sharded_run_resumed_from_its_checkpoint_ends_with_the_same_adapter(runs):
    resumed, uninterrupted = runs / "interrupted", runs / "lora"
    expected, got = adapter(uninterrupted), adapter(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert losses(resumed) == losses(uninterrupted)
    assert [json.loads(line)["step"] for line in (resumed / "train_log.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_sharded_full_fine_tuning_saves_the_whole_trained_model(runs):
    single, sharded = load_file(str(runs / "single-full" / "model.safetensors")), load_file(str(runs / "full" / "model.safetensors"))
    base = load_file(str(Path(json.loads((runs / "full" / "run.json").read_text())["config"]["model"]) / "model.safetensors"))
    assert sharded.keys() == single.keys() == base.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=0, atol=TOLERANCE, msg=key)
    changed = [k for k in base if not torch.equal(base[k], sharded[k])]
    assert len(changed) > len(base) // 2  # the trained weights, not the base's


def test_sharding_needs_several_processes_and_refuses_what_it_cannot_split(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert resolve_sharding("none", 2, "lora", False) == "none"
    assert resolve_sharding("fsdp", 2, "lora", False) == "fsdp"
    with pytest.raises(ValueError, match="this run has one: launch it with torchrun --nproc_per_node N"):
        resolve_sharding("fsdp", 1, "lora", False)
    with pytest.raises(ValueError, match="--sharding fsdp with --quantize"):
        resolve_sharding("fsdp", 2, "lora", False, quantized=True)
    with pytest.raises(ValueError, match="adalora moves rank between layers"):
        resolve_sharding("fsdp", 2, "adalora", True)
    # an Accelerate FSDP config (accelerate launch --config_file configs/accelerate/fsdp.yaml) turns it on
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert resolve_sharding("none", 2, "lora", False) == "fsdp"
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ValueError, match="fsdp_offload_params: true"):
        resolve_sharding("none", 2, "lora", False)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP version 1; peftkit shards with FSDP2: set fsdp_version: 2"):
        resolve_sharding("none", 2, "lora", False)
    with pytest.raises(ValueError, match="sharding must be one of none, fsdp"):
        TrainConfig(sharding="zero3")
