"""Fault injection: kill -9 at seeded random write sites of `peftkit train` (checkpoints, the log, the final
save) and `peftkit merge`, and a real full disk (a small tmpfs, where this machine lets us mount one).

After every kill, each folder is complete or absent, and `--resume` (or running merge again) ends with
exactly what an uninterrupted run writes. The children are forked from a forkserver that imported peftkit
once, so each kill costs a few training steps rather than a Python start-up.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_pipeline as tiny
from faults import leftovers, run_cli
from peftkit.cli import main
from peftkit.io.files import DiskFull

SEED = 20260  # which write sites are hit; fixed so a failure reproduces
CHECKPOINT_FILES = {"state.json", "trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
                    "rng-0.safetensors", "rng-0.json"}


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["faults", "peftkit.cli", "peftkit.train", "peftkit.evaluate", "transformers.modeling_utils"])
    return ctx


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {"root": root, "model": tiny.model_dir(root, "llama"),
            "data": tiny.write_jsonl(root / "train.jsonl", tiny.dialogue_rows(12, seed=0))}


def in_child(ctx, argv: list[str], fail_at: int, events: Path) -> int:
    proc = ctx.Process(target=run_cli, args=(argv, fail_at, "kill", str(events)))
    proc.start()
    proc.join(300)
    return proc.exitcode


def train_args(work, output: Path) -> list[str]:
    return ["train", "--model", work["model"], "--data", work["data"], "--max-source-tokens", "32", "--precision", "fp32",
            "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "1", "--lr", "5e-3", "--batch-size", "2",
            "--log-every", "1", "--output", str(output)]


def assert_run_folder_complete_or_absent(output: Path) -> None:
    for checkpoint in (output / "checkpoints").glob("step-*"):
        assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES, checkpoint
        for f in checkpoint.glob("*.safetensors"):
            load_file(str(f))  # whole, not torn
    if (output / "run.json").exists():
        json.loads((output / "run.json").read_text())
        load_file(str(output / "adapter_model.safetensors"))
        json.loads((output / "adapter_config.json").read_text())
        json.loads((output / "tokenizer.json").read_text())
    else:  # no result yet: nothing that looks like an adapter
        assert not (output / "adapter_config.json").exists()


def test_kill_9_anywhere_in_training_then_resume_gives_the_same_adapter(work, forkserver, tmp_path):
    reference = tmp_path / "reference" / "run"
    assert in_child(forkserver, train_args(work, reference), 0, tmp_path / "events.json") == 0
    events = json.loads((tmp_path / "events.json").read_text())
    phases = {"checkpoint": [], "log": [], "final save": []}
    for site, (_, path) in enumerate(events, 1):
        if "/checkpoints/" in path:
            phases["checkpoint"].append(site)
        elif path.endswith("train_log.jsonl"):
            phases["log"].append(site)
        elif ".staging-" in path or Path(path).parent == reference:
            phases["final save"].append(site)
    assert all(phases.values()), phases
    rng = random.Random(SEED)
    sites = sorted(rng.sample(phases["checkpoint"], 2) + rng.sample(phases["final save"], 2) + rng.sample(phases["log"], 1))
    expected = load_file(str(reference / "adapter_model.safetensors"))
    for site in sites:
        output = tmp_path / f"killed-at-{site}" / "run"
        assert in_child(forkserver, train_args(work, output), site, tmp_path / "ignored.json") == -9, site
        assert_run_folder_complete_or_absent(output)
        assert main([*train_args(work, output), "--resume"]) == 0
        got = load_file(str(output / "adapter_model.safetensors"))
        assert all(torch.equal(expected[k], got[k]) for k in expected), f"killed at write site {site}: {events[site - 1]}"
        assert [json.loads(line)["step"] for line in (output / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
        assert leftovers(output.parent) == [], site


def test_kill_9_anywhere_in_merge_leaves_the_whole_model_or_nothing(work, forkserver, tmp_path):
    adapter = tmp_path / "adapter"
    assert main([*train_args(work, adapter), "--max-steps", "1"]) == 0
    args = lambda output: ["merge", "--model", work["model"], "--adapter", str(adapter), "--output", str(output)]  # noqa: E731
    reference = tmp_path / "reference" / "merged"
    assert in_child(forkserver, args(reference), 0, tmp_path / "events.json") == 0
    events = json.loads((tmp_path / "events.json").read_text())
    expected = load_file(str(reference / "model.safetensors"))
    for site in sorted(random.Random(SEED).sample(range(1, len(events) + 1), 3)):
        output = tmp_path / f"killed-at-{site}" / "merged"
        assert in_child(forkserver, args(output), site, tmp_path / "ignored.json") == -9, site
        if output.exists():  # complete: every file, loadable
            assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in output.iterdir()}
            got = load_file(str(output / "model.safetensors"))
            assert all(torch.equal(expected[k], got[k]) for k in expected)
        assert main([*args(output), "--overwrite"]) == 0  # the next run cleans up and writes it whole
        got = load_file(str(output / "model.safetensors"))
        assert all(torch.equal(expected[k], got[k]) for k in expected), f"killed at write site {site}: {events[site - 1]}"
        assert leftovers(output.parent) == [], site


# --- a real full disk ----------------------------------------------------------------------------------
@pytest.fixture()
def small_disk(tmp_path):
    """A 96 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_during_merge_names_the_folder_and_leaves_nothing(work, small_disk, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert main([*train_args(work, adapter), "--max-steps", "1"]) == 0
    output = small_disk / "merged"  # the tiny model's weights (~110 KB) do not fit
    assert main(["merge", "--model", work["model"], "--adapter", str(adapter), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"No space left on the device while writing {output}" in err and "it needs about" in err, err
    assert list(small_disk.iterdir()) == []


def test_a_really_full_disk_during_the_final_save_keeps_no_half_result(work, small_disk):
    from peftkit import LoraConfig, get_peft_model
    from peftkit.hub import load_model
    from peftkit.train.checkpoint import save_final

    base, tokenizer = load_model(work["model"])
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    output = small_disk / "run"
    (output / "checkpoints").mkdir(parents=True)
    (output / "train_log.jsonl").write_text('{"step": 1}\n')
    ballast = small_disk / "ballast"  # leaves room for the adapter, not for the tokenizer (written from Rust)
    ballast.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 12 * 1024))
    with pytest.raises(DiskFull, match=rf"No space left on the device while writing {output}"):
        save_final(output, model, tokenizer, {"steps": 1}, full_model=False)
    assert sorted(p.name for p in output.iterdir()) == ["checkpoints", "train_log.jsonl"]
    assert leftovers(small_disk) == []
    ballast.unlink()
    save_final(output, model, tokenizer, {"steps": 1}, full_model=False)
    assert (output / "run.json").is_file() and (output / "tokenizer.json").is_file()
