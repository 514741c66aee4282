"""Files on disk, complete or absent: staged outputs, a full disk, stale leftovers, the umask, merge's
--output checks and a torn training log. (kill -9 at random moments: test_faults.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

import tiny_pipeline as tiny
from faults import Injector, inject, leftovers
from peftkit import LoraConfig, get_peft_model
from peftkit.cli import main
from peftkit.data import PromptFormat
from peftkit.hub import load_model
from peftkit.io.files import DiskFull, atomic_write_text, remove_stale, staged_directory
from peftkit.train import TrainConfig, train
from peftkit.train.checkpoint import save_checkpoint, save_final


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    model_dir = tiny.model_dir(root, "llama")
    base, tokenizer = load_model(model_dir)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(root / "adapter")
    return {"root": root, "model": model_dir, "adapter": str(root / "adapter"), "peft": model, "tokenizer": tokenizer}


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- the umask ---------------------------------------------------------------------------------------
def test_saved_files_and_folders_follow_the_umask(work, tmp_path):
    old = os.umask(0o022)
    try:
        work["peft"].save_pretrained(tmp_path / "adapter")
        with staged_directory(tmp_path / "staged") as staging:
            atomic_write_text(staging / "x.json", "{}")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*(tmp_path / "adapter").iterdir(), tmp_path / "staged" / "x.json"]}
    assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644, "x.json": 0o644}
    assert stat.S_IMODE((tmp_path / "staged").stat().st_mode) == 0o755


# --- peftkit merge --output ----------------------------------------------------------------------------
def test_merge_refuses_its_inputs_folders_and_a_non_empty_output(work, tmp_path, capsys):
    before = digest(work["model"])
    for output in (work["model"], work["adapter"], str(Path(work["model"]).parent)):
        args = ["merge", "--model", work["model"], "--adapter", work["adapter"], "--output", output]
        assert main(args) == 2 and main([*args, "--overwrite"]) == 2
        assert "would overwrite the" in capsys.readouterr().err
    assert digest(work["model"]) == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    args = ["merge", "--model", work["model"], "--adapter", work["adapter"], "--output", str(busy)]
    assert main(args) == 2
    assert "is not empty; add --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0  # replaced as a whole: nothing of the old contents stays
    assert not (busy / "notes.txt").exists() and (busy / "config.json").is_file() and (busy / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_a_staged_folder_replaces_its_own_earlier_version_whole_and_moves_into_other_folders(tmp_path):
    def write(folder, last=()):
        with staged_directory(folder, last=last) as staging:
            atomic_write_text(staging / "predictions.jsonl", "new\n")
            atomic_write_text(staging / "metrics.json", "{}\n")

    evaluation = tmp_path / "eval"
    write(evaluation)
    inode = evaluation.stat().st_ino
    write(evaluation)  # only its own earlier files: replaced as a whole (a new folder, renamed in)
    assert evaluation.stat().st_ino != inode and sorted(os.listdir(evaluation)) == ["metrics.json", "predictions.jsonl"]
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    write(tmp_path / "adapter", last=("metrics.json",))  # someone else's folder: the files move in, nothing is lost
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "metrics.json", "predictions.jsonl"]
    with pytest.raises(RuntimeError), staged_directory(tmp_path / "adapter") as staging:
        atomic_write_text(staging / "metrics.json", "half")
        raise RuntimeError("the evaluation failed")
    assert (tmp_path / "adapter" / "metrics.json").read_text() == "{}\n" and leftovers(tmp_path) == []


# --- a full disk at every write site --------------------------------------------------------------------
def fault_sites(action) -> list[int]:
    """The write sites ``action()`` reaches that a full disk can fail (renames need no space)."""
    with inject(Injector()) as counter:
        action()
    return [i for i, (kind, _) in enumerate(counter.events, 1) if kind not in ("rename", "replace")]


def test_a_full_disk_during_the_final_save_keeps_the_previous_result_and_names_the_folder(work, tmp_path):
    output = tmp_path / "run"
    (output / "checkpoints").mkdir(parents=True)
    (output / "train_log.jsonl").write_text('{"step": 1}\n')
    save = lambda: save_final(output, work["peft"], work["tokenizer"], {"steps": 1}, full_model=False)  # noqa: E731
    save()
    before = digest(output)
    sites = fault_sites(save)
    assert len(sites) >= 8  # adapter weights and config, tokenizer files, run.json, the commit marker
    for site in sites:
        with inject(Injector(site)), pytest.raises(DiskFull) as error:
            save()
        assert str(output) in str(error.value) and "needs about" in str(error.value)
        assert digest(output) == before, site
        assert leftovers(tmp_path) == [], site


def test_a_full_disk_during_merge_leaves_no_output(work, tmp_path, capsys):
    output = tmp_path / "merged"
    args = ["merge", "--model", work["model"], "--adapter", work["adapter"], "--output", str(output)]
    with inject(Injector()) as counter:
        assert main(args) == 0
    sites = [i for i, (kind, path) in enumerate(counter.events, 1) if kind not in ("rename", "replace") and ".staging-" in path]
    assert len(sites) >= 4  # config.json, generation_config.json, model.safetensors, tokenizer files
    for site in sites:
        import shutil

        shutil.rmtree(output, ignore_errors=True)
        with inject(Injector(site)):
            assert main(args) == 2
        err = capsys.readouterr().err
        assert f"No space left on the device while writing {output}" in err and "needs about" in err, err
        assert not output.exists() and leftovers(tmp_path) == [], site


class _OneProcess:
    is_main_process, process_index = True, 0

    def wait_for_everyone(self) -> None:
        pass


def test_a_full_disk_during_a_checkpoint_leaves_no_partial_checkpoint(work, tmp_path):
    model = work["peft"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save = lambda: save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"step": 2}, _OneProcess(), keep=2)  # noqa: E731
    sites = fault_sites(save)
    assert len(sites) >= 12
    for site in sites[::2]:  # each file is created then opened: every other site is enough
        import shutil

        shutil.rmtree(tmp_path / "checkpoints")
        with inject(Injector(site)), pytest.raises(DiskFull) as error:
            save()
        assert "/checkpoints/.tmp-step-00000002/" in str(error.value) and "it needs" in str(error.value)
        assert os.listdir(tmp_path / "checkpoints") == [], site


# --- leftovers of killed processes ----------------------------------------------------------------------
def test_the_next_run_removes_what_killed_processes_left_and_finishes_committed_moves(tmp_path):
    gone, alive = dead_pid(), os.getpid()
    (tmp_path / f".model.safetensors.{gone}-0123abcd.tmp").write_bytes(b"half")
    (tmp_path / f".other.json.{alive}-0123abcd.tmp").write_bytes(b"in progress")  # a live writer's: kept
    (tmp_path / f".merged.staging-{gone}").mkdir()
    (tmp_path / f".merged.staging-{gone}" / "config.json").write_text("")  # never committed: dropped
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text("")
    staging = tmp_path / f".run.staging-{gone}"
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_text("weights")
    (staging / "run.json").write_text("{}")
    (tmp_path / f".run.staging-{gone}.committed").write_text(json.dumps({"last": ["run.json"], "replace": False}))
    remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.json.{alive}-0123abcd.tmp", "run"]
    assert sorted(p.name for p in run.iterdir()) == ["adapter_model.safetensors", "run.json", "train_log.jsonl"]


# --- train_log.jsonl cut off by a kill --------------------------------------------------------------------
def test_resume_drops_a_torn_last_log_line_and_says_so(work, tmp_path, capsys):
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.dialogue_rows(8, seed=0))
    cfg = dict(model=work["model"], data=data, output=str(tmp_path / "run"), format=PromptFormat(max_source_tokens=32),
               precision="fp32", max_steps=2, save_every=1, log_every=1, batch_size=2)
    train(TrainConfig(**cfg))
    log = tmp_path / "run" / "train_log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # what a kill in the middle of a write leaves
    (tmp_path / "run" / "run.json").unlink()
    train(TrainConfig(**cfg, resume=True))
    assert f"{log}: dropped its last line" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
