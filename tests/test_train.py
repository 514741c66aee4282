"""The training loop on tiny models: loss, fast paths against plain paths, checkpoints and resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_pipeline as tiny
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.data import IGNORE_INDEX, PromptFormat, collate_for_training, encode_examples, read_examples
from peftkit.hub import load_model
from peftkit.train import TrainConfig, TrainingDiverged, build_train_config, loss_fn, lr_factor, train
from peftkit.train import loop as loop_module

REPO = Path(__file__).resolve().parents[1]
FORMAT = PromptFormat(max_source_tokens=48)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "root": root,
        "llama": tiny.model_dir(root, "llama"),
        "data": tiny.write_jsonl(root / "train.jsonl", tiny.dialogue_rows(32, seed=0)),
        "eval": tiny.write_jsonl(root / "eval.jsonl", tiny.dialogue_rows(8, seed=1)),
    }


def config(work, output, **kw) -> TrainConfig:
    kw.setdefault("precision", "fp32")
    kw.setdefault("log_every", 1)
    cfg = TrainConfig(model=work["llama"], data=work["data"], output=str(output), format=PromptFormat(max_source_tokens=48), **kw)
    return cfg


def adapter(output) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output) / "adapter_model.safetensors"))


def log_lines(output) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / "train_log.jsonl").read_text().splitlines()]


# --- the schedule ------------------------------------------------------------------------------------
def test_lr_schedule_warms_up_then_decays():
    total, warm = 100, 10
    factors = [lr_factor(s, "cosine", warm, total) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and 0 < factors[-1] < 0.01
    assert lr_factor(55, "linear", warm, total) == pytest.approx(0.5)
    assert lr_factor(99, "constant", warm, total) == 1.0


# --- target-only logits equal the plain loss ------------------------------------------------------------
def _batch(arch: str, tmp_path) -> dict[str, torch.Tensor]:
    seq2seq = arch in ("t5", "bart")
    tok = tiny.tokenizer(seq2seq=seq2seq)
    examples = read_examples(tiny.write_jsonl(tmp_path / "b.jsonl", tiny.dialogue_rows(3)))
    return collate_for_training(encode_examples(examples, tok, FORMAT, seq2seq).items, tok.pad_token_id)


def _loss_and_grads(model, batch, target_only: bool):
    model.zero_grad()
    total, n = loss_fn(model, batch, target_only)
    (total / n).backward()
    return (total / n).detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_target_only_logits_give_the_models_own_loss_and_gradients(arch, tmp_path):
    from conftest import build

    model = get_peft_model(build(arch), LoraConfig(r=4, init_lora_weights=False)).train()
    batch = _batch(arch, tmp_path)
    hf_loss = model(**batch).loss  # the reference: transformers' loss over full logits
    plain, plain_grads = _loss_and_grads(model, batch, target_only=False)
    fast, fast_grads = _loss_and_grads(model, batch, target_only=True)
    assert torch.allclose(plain, hf_loss, rtol=1e-6)
    assert torch.allclose(fast, plain, rtol=1e-5, atol=1e-6)
    for name in plain_grads:
        assert torch.allclose(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6), name
    if arch in ("llama", "gpt2"):  # the fast path ran the output head on the target positions only
        shapes = []
        head = model.get_base_model().get_output_embeddings()
        handle = head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
        try:
            loss_fn(model, batch, target_only=True)
        finally:
            handle.remove()
        assert shapes == [(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), 128)]


def test_target_only_logits_follow_labels_that_a_soft_prompt_extends(tmp_path):
    from conftest import build

    with tiny.soft_prompt_method() as SoftPromptConfig:
        model = get_peft_model(build("llama"), SoftPromptConfig())
        batch = _batch("llama", tmp_path)
        prompt = model._tuners["default"].prompt
        results = {}
        for target_only in (False, True):
            prompt.grad = None
            total, n = loss_fn(model, batch, target_only)
            (total / n).backward()
            results[target_only] = ((total / n).detach(), prompt.grad.clone(), n)
    (plain_loss, plain_grad, plain_n), (fast_loss, fast_grad, fast_n) = results[False], results[True]
    assert torch.allclose(fast_loss, plain_loss, rtol=1e-5)
    assert torch.allclose(fast_grad, plain_grad, rtol=1e-4, atol=1e-7) and plain_grad.abs().max() > 0
    assert fast_n == plain_n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # virtual tokens add no targets


def test_bf16_autocast_keeps_fp32_adapter_weights_and_matches_fp32_loss(tmp_path):
    from conftest import build

    from peftkit.precision import autocast

    model = get_peft_model(build("llama"), LoraConfig(r=4, init_lora_weights=False)).train()
    batch = _batch("llama", tmp_path)
    fp32, _ = loss_fn(model, batch, target_only=False)
    with autocast(torch.device("cpu"), True):
        bf16, _ = loss_fn(model, batch, target_only=False)
    assert bf16.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.allclose(bf16, fp32, rtol=2e-2) and not torch.equal(bf16, fp32)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    from conftest import build

    batch = _batch("llama", tmp_path)
    grads = []
    for checkpointing in (False, True):
        base = build("llama")
        if checkpointing:
            loop_module.enable_gradient_checkpointing(base)
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False)).train()
        grads.append(_loss_and_grads(model, batch, target_only=True)[1])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7), name


# --- the loop ------------------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_saves_a_peft_adapter(work):
    out = work["root"] / "learn"
    options = {"target_modules": "all-linear"}
    run = train(config(work, out, max_steps=40, lr=1e-2, eval_data=work["eval"], eval_every=20, batch_size=8, method_options=options))
    lines = log_lines(out)
    losses = [line["loss"] for line in lines if "loss" in line]
    assert [line["step"] for line in lines] == list(range(0, 41))  # step 0: held-out loss before training
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15  # a random tiny model: ~4.75 -> ~4.45
    evals = [line["eval_loss"] for line in lines if "eval_loss" in line]
    assert len(evals) == 3 and evals[2] < evals[1] < evals[0] == run["eval_loss_before"]
    assert {"step", "loss", "lr", "tokens_per_s", "elapsed_s"} <= set(lines[1])
    assert set(os.listdir(out)) >= {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "run.json", "train_log.jsonl"}
    saved = json.loads((out / "run.json").read_text())
    assert saved == json.loads(json.dumps(run))
    assert saved["config"]["lr"] == 1e-2 and saved["precision"] == "fp32" and saved["steps"] == 40
    assert saved["config"]["gradient_checkpointing"] is False  # the default resolves to off on an unquantized base
    assert 0 < saved["trainable_params"] < saved["total_params"] and saved["peak_rss_mb"] > 0 and saved["wall_time_s"] > 0
    # The saved adapter reproduces the trained model.
    base, tok = load_model(work["llama"])
    reloaded = PeftModel.from_pretrained(base, out)
    config_json = json.loads((out / "adapter_config.json").read_text())
    assert config_json["peft_type"] == "LORA" and config_json["task_type"] == "CAUSAL_LM"
    ids = torch.tensor([tok("# person1 # : alice buys a book today ? summary :")["input_ids"]])
    assert reloaded(input_ids=ids).logits.shape == (1, ids.shape[1], 128)


def test_seq2seq_training_lowers_the_loss(work):
    out = work["root"] / "t5"
    cfg = config(work, out, max_steps=30, lr=1e-2, batch_size=8, method_options={"target_modules": "all-linear"})
    cfg.model = tiny.model_dir(work["root"], "t5")
    train(cfg)
    losses = [line["loss"] for line in log_lines(out)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15


def test_gradient_accumulation_equals_one_large_batch(work):
    runs = {}
    for batch_size, accum in ((4, 1), (2, 2), (1, 4)):
        out = work["root"] / f"accum-{batch_size}x{accum}"
        train(config(work, out, max_steps=4, batch_size=batch_size, grad_accum=accum, lr=1e-2, method_options=_no_dropout()))
        runs[(batch_size, accum)] = adapter(out)
    reference = runs[(4, 1)]
    for key, tensors in runs.items():
        for name in reference:
            assert torch.allclose(tensors[name], reference[name], atol=2e-6), (key, name)


def _no_dropout():
    return {"lora_dropout": 0.0}


def test_compiled_blocks_train_to_the_same_adapter(work, monkeypatch):
    """``--compile``: the loop compiles the decoder blocks (traced by TorchDynamo; Inductor's own kernels are
    checked against eager in test_fast_paths.py, here its compile time is spared) and gets the same losses,
    held-out losses and adapter as the eager loop, with batches of several lengths; the held-out loss runs eager."""
    from functools import partial

    from torch._dynamo.utils import counters

    from peftkit.train.compile import compile_blocks

    monkeypatch.setattr(loop_module, "compile_blocks", partial(compile_blocks, backend="eager"))
    runs, logs = {}, {}
    for compiled in (False, True):
        out = work["root"] / f"compile-{compiled}"
        torch._dynamo.reset()
        counters.clear()
        train(config(work, out, max_steps=3, batch_size=4, lr=1e-2, compile=compiled, eval_data=work["eval"], eval_limit=4,
                     method_options=_no_dropout()))
        runs[compiled], logs[compiled] = adapter(out), log_lines(out)
        assert bool(counters["stats"]["unique_graphs"]) == compiled and not counters["graph_break"], dict(counters)
    assert json.loads((work["root"] / "compile-True" / "run.json").read_text())["config"]["compile"] is True
    for plain, fast in zip(logs[False], logs[True]):
        for key in ("loss", "eval_loss"):
            if key in plain:
                assert fast[key] == pytest.approx(plain[key], rel=1e-5), (key, plain["step"])
    for name in runs[False]:
        assert torch.allclose(runs[True][name], runs[False][name], atol=1e-5), name


def test_compile_by_default_where_it_pays(work, monkeypatch, capsys):
    """compile=None, the default: a bf16 run on a CPU compiles its blocks when it has enough training tokens to win
    the compile time back, and trains eager when it is short; the log line says why, run.json records which ran."""
    from functools import partial

    from torch._dynamo.utils import counters

    from peftkit.train import compile as compile_module
    from peftkit.train.compile import compile_blocks

    monkeypatch.setattr(loop_module, "compile_blocks", partial(compile_blocks, backend="eager"))
    monkeypatch.setenv("CXX", sys.executable)  # any program will do: the eager backend runs no C++ compiler
    for min_tokens, compiled in ((10**9, False), (1, True)):
        monkeypatch.setattr(compile_module, "AUTO_MIN_TOKENS", min_tokens)
        out = work["root"] / f"auto-compile-{compiled}"
        torch._dynamo.reset()
        counters.clear()
        train(config(work, out, max_steps=2, batch_size=4, precision="bf16", method_options=_no_dropout()))
        said = capsys.readouterr().out
        assert json.loads((out / "run.json").read_text())["config"]["compile"] is compiled
        assert bool(counters["stats"]["unique_graphs"]) == compiled, dict(counters)
        assert ("compiling by default: a run of" if compiled else "is too short to win back the compile time") in said, said
        assert ("1 of 2 transformer blocks compile" in said) == compiled, said


def test_auto_compile_says_why_it_does_not(work, monkeypatch):
    from peftkit.train.compile import AUTO_MIN_TOKENS, auto_compile

    model = get_peft_model(load_model(work["llama"])[0], LoraConfig(r=2))
    cpu, long_run = torch.device("cpu"), AUTO_MIN_TOKENS
    monkeypatch.setenv("CXX", sys.executable)
    assert auto_compile(model, cpu, True, 1, False, long_run) == (True, f"a run of {long_run:,d} training tokens wins back the compile time")
    for args in ((torch.device("cuda"), True, 1, False, long_run), (cpu, False, 1, False, long_run), (cpu, True, 2, False, long_run),
                 (cpu, True, 1, True, long_run)):
        chosen, why = auto_compile(model, *args)
        assert not chosen and why.startswith("compiled by default only where that was measured"), (args, why)
    assert auto_compile(model, cpu, True, 1, False, long_run - 1)[1].endswith(f"({long_run:,d} or more compile)")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert auto_compile(model, cpu, True, 1, False, long_run) == (False, "no C++ compiler (/nonexistent/c++) for torch.compile's CPU code")


def test_compile_refuses_what_it_was_not_built_for(work):
    with pytest.raises(ValueError, match="compile=True works with sharding=none and quantize=none"):
        config(work, "x", compile=True, quantize="nf4")
    with pytest.raises(ValueError, match="compile=True works with sharding=none"):
        config(work, "x", compile=True, sharding="fsdp")
    with pytest.raises(ValueError, match="task 'classify' does not support compile=True"):
        train(config(work, work["root"] / "classify-compiled", task="classify", compile=True))


@pytest.fixture(scope="module")
def uninterrupted(work):
    out = work["root"] / "uninterrupted"
    train(config(work, out, max_steps=8, save_every=2, lr=5e-3))  # dropout 0.05: the RNG state matters
    return out


def test_resume_after_an_interruption_ends_with_the_same_adapter(work, uninterrupted, monkeypatch):
    out = work["root"] / "interrupted"
    real_save = loop_module.save_checkpoint

    def save_then_die(output, step, *args, **kwargs):
        path = real_save(output, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt  # killed right after the step-4 checkpoint
        return path

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config(work, out, max_steps=8, save_every=2, lr=5e-3))
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    assert not (out / "adapter_model.safetensors").exists()
    train(config(work, out, max_steps=8, save_every=2, lr=5e-3, resume=True))
    expected, got = adapter(uninterrupted), adapter(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [line["step"] for line in log_lines(out)] == list(range(1, 9))  # the log reads like one run
    assert [line["loss"] for line in log_lines(out)] == [line["loss"] for line in log_lines(uninterrupted)]


def test_a_checkpoint_cut_off_while_writing_is_ignored(work, uninterrupted, monkeypatch):
    from peftkit.train import checkpoint as checkpoint_module

    out = work["root"] / "torn"
    real = checkpoint_module.save_tensors

    def torn(path, tensors, *args, **kwargs):
        if "step-00000006" in str(path) and Path(path).name == "optimizer.safetensors":
            raise KeyboardInterrupt  # killed in the middle of writing checkpoint 6
        return real(path, tensors, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_tensors", torn)
    with pytest.raises(KeyboardInterrupt):
        train(config(work, out, max_steps=8, save_every=2, lr=5e-3, keep_checkpoints=2))
    monkeypatch.setattr(checkpoint_module, "save_tensors", real)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [".tmp-step-00000006", "step-00000002", "step-00000004"]
    train(config(work, out, max_steps=8, save_every=2, lr=5e-3, keep_checkpoints=2, resume=True))
    expected, got = adapter(uninterrupted), adapter(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]


def test_a_killed_process_resumes_to_the_same_adapter(work, tmp_path):
    """SIGKILL a real `peftkit train` process as soon as its first checkpoint exists, resume, compare."""
    args = ["--model", work["llama"], "--data", work["data"], "--max-source-tokens", "48", "--precision", "fp32",
            "--max-steps", "40", "--save-every", "2", "--lr", "5e-3", "--batch-size", "2", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "train", *args, "--output", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not list((killed / "checkpoints").glob("step-*")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before_kill = (killed / "adapter_model.safetensors").exists()
    from peftkit.cli import main

    assert main(["train", *args, "--output", str(killed), "--resume"]) == 0
    assert main(["train", *args, "--output", str(tmp_path / "whole")]) == 0
    expected, got = adapter(tmp_path / "whole"), adapter(killed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    if finished_before_kill:
        pytest.skip("the run finished before it could be killed (the resumed result still matched)")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(work):
    out = work["root"] / "nan"
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: .*last good checkpoint is .*step-\d+.*Lower --lr"):
        train(config(work, out, max_steps=30, save_every=1, lr=1e30, warmup=0.0, max_grad_norm=0.0))
    checkpoints = list((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    assert all(torch.isfinite(t).all() for t in load_file(str(checkpoints[0] / "trainable.safetensors")).values())
    assert not (out / "adapter_model.safetensors").exists()


def test_resume_refuses_other_settings_and_fresh_runs_refuse_old_checkpoints(work, uninterrupted):
    with pytest.raises(ValueError, match=r"different settings \(lr: 0.005 -> 0.001\)"):
        train(config(work, uninterrupted, max_steps=8, save_every=2, lr=1e-3, resume=True))
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run; add --resume"):
        train(config(work, uninterrupted, max_steps=8, save_every=2, lr=5e-3))


def test_full_fine_tuning_saves_a_complete_trained_model(work):
    from transformers import AutoModelForCausalLM

    out = work["root"] / "full"
    train(config(work, out, max_steps=2, method="full", lr=1e-3))
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(work["llama"]).state_dict()
    assert trained.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(changed) > len(base) // 2, "the saved model should hold the trained weights"


def test_two_processes_with_ddp_match_one_process(work, tmp_path):
    common = ["--model", work["llama"], "--data", work["data"], "--max-source-tokens", "48", "--precision", "fp32",
              "--max-steps", "5", "--lr", "1e-2", "--lora-dropout", "0", "--log-every", "1",
              "--target-modules", "q_proj,v_proj"]  # 4-decimal loss equality holds for these targets; all-linear lands on a rounding edge
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 400),
         "-m", "peftkit.cli", "train", *common, "--batch-size", "2", "--output", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    from peftkit.cli import main

    assert main(["train", *common, "--batch-size", "4", "--output", str(tmp_path / "single")]) == 0
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["processes"] == 2
    single, two = adapter(tmp_path / "single"), adapter(tmp_path / "ddp")
    assert max((single[k] - two[k]).abs().max().item() for k in single) < 1e-5
    assert max(single[k].abs().max().item() for k in single if "lora_B" in k) > 1e-3  # it did train
    assert [round(x["loss"], 4) for x in log_lines(tmp_path / "ddp")] == [round(x["loss"], 4) for x in log_lines(tmp_path / "single")]


# --- configuration ---------------------------------------------------------------------------------------
def test_config_layers_yaml_then_set_then_flags(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data: d.jsonl\noutput: out\nlr: 2e-4\nlora:\n  r: 16\nmax_steps: 10\nformat:\n  max_source_tokens: 300\n")
    cfg = build_train_config(str(yaml_file), ["lr=1e-3", "target_modules=q_proj,v_proj", "format.truncation_side=left"], max_steps=20)
    assert (cfg.lr, cfg.max_steps, cfg.method_options["r"]) == (1e-3, 20, 16)
    assert cfg.method_options["target_modules"] == ["q_proj", "v_proj"]
    assert (cfg.method_config().r, cfg.method_config().lora_alpha) == (16, 16)  # lora_alpha: the preset's 16, not 2 x r
    assert (cfg.format.max_source_tokens, cfg.format.truncation_side) == (300, "left")
    assert build_train_config(sets=["target_modules=all-linear"]).method_options["target_modules"] == "all-linear"
    assert build_train_config(sets=["lora.target_modules=.*proj"]).method_config().target_modules == ".*proj"
    assert build_train_config(sets=["method_options.lora_dropout=0.1"]).method_config().lora_dropout == 0.1
    assert build_train_config(sets=["method=dora", "dora.r=4"], lora_alpha="8").method_config().use_dora
    with pytest.raises(ValueError, match="lora.r is a setting of method 'lora', but the method is 'ia3'"):
        build_train_config(sets=["method=ia3", "lora.r=4"])
    with pytest.raises(ValueError, match="Method 'ia3' has no option 'r'; it takes: target_modules"):
        build_train_config(sets=["method=ia3", "r=4"])
    with pytest.raises(ValueError, match="Method 'bitfit' fixes patterns"):
        build_train_config(sets=["method=bitfit", "patterns=x"])
    with pytest.raises(ValueError, match="lora.r must be an integer"):
        build_train_config(sets=["r=big"])
    with pytest.raises(ValueError, match="Unknown setting 'learning_rate'; known settings: .*lr"):
        build_train_config(sets=["learning_rate=1"])
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        build_train_config(sets=["batch_size=two"])
    with pytest.raises(ValueError, match="warmup is a fraction"):
        build_train_config(sets=["warmup=10"])
    with pytest.raises(ValueError, match="schedule must be one of"):
        build_train_config(sets=["schedule=step"])


def test_old_option_names_still_work_for_one_release(capsys, monkeypatch):
    from peftkit import registry
    from peftkit.cli import build_parser
    from peftkit.commands._args import flags_from

    monkeypatch.setattr(registry, "_WARNED", set())  # each notice is printed once per process; earlier tests may have printed it

    args = build_parser().parse_args(["train", "--rank", "16", "--dropout", "0.1"])
    cfg = build_train_config(args.config, args.set, **flags_from(args, args._dests))
    # The old default alpha = 2 x rank is kept for the old name, so an old command trains the same model.
    assert (cfg.method_options, cfg.method_config().lora_alpha) == ({"r": 16, "lora_dropout": 0.1, "lora_alpha": 32}, 32)
    err = capsys.readouterr().err
    assert "'rank' (--rank) is deprecated" in err and "use 'r' (--r)" in err and "use 'lora_dropout'" in err
    assert build_train_config(sets=["rank=4", "alpha=4"]).method_config().lora_alpha == 4
    with pytest.raises(ValueError, match="Both 'rank' and 'r' are set"):
        build_train_config(sets=["rank=4", "r=8"])


def test_cli_reports_bad_input_in_one_line(work, tmp_path, capsys):
    from peftkit.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi"}\n')
    assert main(["train", "--model", work["llama"], "--data", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl: row 1 matches no layout" in err and "--input-field and --target-field" in err
    assert main(["train", "--data", "x.jsonl", "--output", "o", "--method", "lora", "--set", "num_virtual_tokens=5"]) == 2
    assert "Method 'lora' has no option 'num_virtual_tokens'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--batch-size", "zero"])
    assert "--batch-size must be an integer" in capsys.readouterr().err


def test_train_help_explains_every_option(capsys):
    from peftkit.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--r", "--lora-alpha", "--lora-dropout", "--rank", "--alpha", "--dropout", "--target-modules", "--num-virtual-tokens", "--init-text", "--bottleneck-size",
                 "--placement", "--patterns", "--layers", "--epochs", "--max-steps", "--batch-size", "--grad-accum", "--lr",
                 "--warmup", "--eval-data", "--eval-every", "--save-every", "--seed", "--config", "--set", "--resume", "--precision",
                 "--compile", "--no-compile"):
        assert flag in text, flag
    assert "(default: 'smollm2-135m-instruct')" in text
    # --lr defaults to each method's own learning rate, which the method list shows.
    flat = " ".join(text.split())
    assert "none given: the method's own default" in flat and "(default lr 0.0005)" in flat and "(default lr 0.0001)" in flat
