"""`peftkit compare` / `peftkit sweep` on tiny models: the report's fields and arithmetic, failures, resume, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny_pipeline as tiny
from peftkit.cli import main
from peftkit.data import PromptFormat
from peftkit.evaluate import ScoringSettings
from peftkit.evaluate.forgetting import ForgettingSettings
from peftkit.experiments import REPORT_FIELDS, CompareConfig, SweepConfig, build_experiment_config, run_experiment
from peftkit.experiments import worker as worker_module
from peftkit.experiments.report import rank_choice, rank_choice_sentence
from peftkit.experiments.runner import _execute, entry_spec, file_identity
from peftkit.registry import get_preset
from peftkit.train import TrainConfig
from peftkit.train import loop as loop_module

# Forgetting measured on a handful of short texts: the arithmetic, not the number, is under test here.
SMALL = ForgettingSettings(general_texts=3, general_tokens=16, topic_rows=2, topic_tokens=16)
SMALL_FLAGS = ["--general-texts", "3", "--general-tokens", "16", "--topic-rows", "2", "--topic-tokens", "16"]
OFF_FLAGS = ["--general-texts", "0", "--topic-rows", "0"]
ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return {
        "root": root,
        "llama": tiny.model_dir(root, "llama"),
        "train": tiny.write_jsonl(root / "train.jsonl", tiny.dialogue_rows(32, seed=0)),
        "eval": tiny.write_jsonl(root / "eval.jsonl", tiny.dialogue_rows(8, seed=1, references=2)),
    }


def settings(work, output, cls=CompareConfig, **kw):
    """A few steps and rows on the tiny Llama, in this process (isolate=False keeps the tests fast)."""
    base = dict(model=work["llama"], train_data=work["train"], eval_data=work["eval"], output=str(output), max_steps=4,
                batch_size=4, eval_limit=6, max_new_tokens=6, eval_batch_size=4, latency_rows=2, example_rows=2,
                precision="fp32", isolate=False, log_every=2, **{"format.max_source_tokens": 48}, forgetting=SMALL)
    return build_experiment_config(cls, **{**base, **kw})


def report_of(output) -> dict:
    return json.loads((Path(output) / "report.json").read_text())


def by_name(report) -> dict[str, dict]:
    return {m["name"]: m for m in report["methods"]}


@pytest.fixture(scope="module")
def compared(work):
    """baseline, full, lora (lr given per method) and ia3 (its default lr), through the command line."""
    out = work["root"] / "cmp"
    code = main(["compare", "--model", work["llama"], "--train-data", work["train"], "--eval-data", work["eval"],
                 "--output", str(out), "--methods", "baseline,full,lora,ia3", "--per-method", "lora.lr=5e-3,lora.r=4",
                 "--max-steps", "4", "--batch-size", "4", "--eval-limit", "6", "--max-new-tokens", "6",
                 "--eval-batch-size", "4", "--latency-rows", "2", "--example-rows", "2", "--precision", "fp32",
                 "--no-isolate", "--max-source-tokens", "48", "--metrics", "rouge,token_f1,loss", "--reference-mode", "mean",
                 *SMALL_FLAGS])
    return code, out, report_of(out)


def test_every_documented_field_is_in_every_finished_entry(compared):
    code, _, report = compared
    assert code == 0
    assert [m["name"] for m in report["methods"]] == ["baseline", "full", "lora", "ia3"]
    for m in report["methods"]:
        assert m["status"] == "ok", m
        assert set(REPORT_FIELDS) <= set(m), sorted(set(REPORT_FIELDS) - set(m))
        assert set(m) <= set(REPORT_FIELDS), sorted(set(m) - set(REPORT_FIELDS))  # nothing undocumented either


def test_rouge_and_deltas_are_the_evaluations_numbers(compared):
    _, out, report = compared
    rows = by_name(report)
    for name, m in rows.items():
        metrics = json.loads((out / "runs" / name / "eval" / "metrics.json").read_text())
        assert metrics["n"] == m["eval_examples"] == 6 and metrics["references_per_example"] == 2
        for k in ROUGE:
            assert m[k] == metrics[k]
            assert m[f"{k}_delta"] == pytest.approx(m[k] - rows["baseline"][k], abs=1e-12)
    assert all(rows["baseline"][f"{k}_delta"] == 0 for k in ROUGE)


def test_every_reference_mode_and_chosen_metric_reaches_the_report(compared):
    _, out, report = compared
    assert report["settings"]["scoring"]["reference_mode"] == "mean"
    for name, m in by_name(report).items():
        metrics = json.loads((out / "runs" / name / "eval" / "metrics.json").read_text())
        assert m["reference_mode"] == "mean" and m["rouge1"] == m["rouge1_mean"]
        for k in ("rouge1", "rougeL", "token_f1"):
            assert [m[f"{k}_{mode}"] for mode in ("max", "mean", "first")] == [metrics[f"{k}_{mode}"] for mode in ("max", "mean", "first")]
            assert m[f"{k}_max"] >= m[f"{k}_mean"]  # the best reference scores at least the average one
        assert m["loss"] == metrics["loss"] > 0 and m["bleu"] is None and m["bleu_max"] is None  # not asked for
        assert m["loss_delta"] == pytest.approx(m["loss"] - by_name(report)["baseline"]["loss"])
    md = (out / "report.md").read_text()
    assert "Headline reference mode: mean" in md and "ROUGE-1 (mean / max / first)" in md
    lora = by_name(report)["lora"]
    assert f"| lora | {100 * lora['rouge1_mean']:.2f} / {100 * lora['rouge1_max']:.2f} / {100 * lora['rouge1_first']:.2f} |" in md


def test_other_metrics_rescore_without_training_again(work, tmp_path, monkeypatch, capsys):
    trained = []
    real_train = loop_module.train
    monkeypatch.setattr(worker_module, "train", lambda cfg: trained.append(cfg.method) or real_train(cfg))
    run_experiment(settings(work, tmp_path, methods=["lora"], latency_rows=0, example_rows=0))
    assert by_name(report_of(tmp_path))["lora"]["chrf"] is None
    run_experiment(settings(work, tmp_path, methods=["lora"], latency_rows=0, example_rows=0,
                            scoring=ScoringSettings(metrics=["rouge", "chrf"], reference_mode="first")))
    assert trained == ["lora"]  # trained once; evaluated twice
    assert "evaluating again (the training is kept)" in capsys.readouterr().out
    lora = by_name(report_of(tmp_path))["lora"]
    assert lora["chrf"] == lora["chrf_first"] is not None and lora["rouge1"] == lora["rouge1_first"]
    with pytest.raises(ValueError, match="a comparison always scores ROUGE"):
        settings(work, tmp_path, scoring=ScoringSettings(metrics=["chrf"]))


def test_parameters_learning_rates_and_stored_sizes(compared, work):
    _, out, report = compared
    rows = by_name(report)
    total = rows["baseline"]["total_params"]
    # LoRA r=4 on every linear layer of 2 layers (the lora preset's default): q/o 32 -> 32, k/v 32 -> 16,
    # gate/up 32 -> 64, down 64 -> 32; r x (in + out) each.
    assert rows["lora"]["trainable_params"] == 2 * 4 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))
    assert rows["lora"]["method_options"] == {"r": 4}
    assert rows["lora"]["total_params"] == total + rows["lora"]["trainable_params"]
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"] == total
    assert rows["baseline"]["trainable_params"] == 0 and rows["baseline"]["trainable_percent"] == 0
    for m in rows.values():
        assert m["trainable_percent"] == pytest.approx(100 * m["trainable_params"] / m["total_params"])
    assert rows["full"]["trainable_percent"] == pytest.approx(100)
    # Learning rates: given per method, or the method's default; each recorded in the entry's run.json too.
    assert (rows["lora"]["lr"], rows["ia3"]["lr"], rows["full"]["lr"]) == (5e-3, get_preset("ia3").default_lr, get_preset("full").default_lr)
    assert json.loads((out / "runs" / "lora" / "train" / "run.json").read_text())["lr"] == 5e-3
    assert rows["baseline"]["lr"] is None
    # Stored per task: the adapter files, or the whole model's weights and configs; never the tokenizer or logs.
    lora_dir = out / "runs" / "lora" / "train"
    assert rows["lora"]["stored_files"] == {n: (lora_dir / n).stat().st_size for n in ("adapter_config.json", "adapter_model.safetensors")}
    assert rows["lora"]["stored_bytes"] == sum(rows["lora"]["stored_files"].values())
    assert "model.safetensors" in rows["full"]["stored_files"] and "tokenizer.json" not in rows["full"]["stored_files"]
    assert rows["full"]["stored_bytes"] > 4 * total  # fp32 weights
    assert rows["baseline"]["stored_bytes"] == 0


def test_training_and_latency_figures(compared):
    _, _, report = compared
    rows = by_name(report)
    for name in ("full", "lora", "ia3"):
        m = rows[name]
        assert m["train_steps"] == 4 and m["train_examples_seen"] == 16
        assert m["train_time_s"] > 0 and m["train_tokens_per_s"] > 0 and m["peak_train_memory_mb"] > 0
    assert rows["baseline"]["train_time_s"] is None and rows["baseline"]["peak_train_memory_mb"] is None
    for m in rows.values():
        assert m["latency_rows"] == 2 and m["latency_s_per_example"] > 0 and m["latency_ms_per_token"] > 0
    # Mergeable adapters are timed merged too; a plain model (baseline, full) has nothing to merge.
    assert rows["lora"]["latency_merged_s_per_example"] > 0 and rows["ia3"]["latency_merged_s_per_example"] > 0
    assert rows["baseline"]["latency_merged_s_per_example"] is None and rows["full"]["latency_merged_s_per_example"] is None


def test_forgetting_is_each_entry_against_the_same_base_scores(compared):
    _, out, report = compared
    rows = by_name(report)
    base = json.loads((out / "forgetting_base.json").read_text())["scores"]
    for m in rows.values():
        assert m["general_loss_base"] == base["general_loss"] and m["topic_accuracy_base"] == base["topic_accuracy"]
        assert m["forgetting"] == pytest.approx(m["general_loss"] - m["general_loss_base"], abs=1e-12)
        assert m["topic_accuracy_delta"] == pytest.approx(m["topic_accuracy"] - m["topic_accuracy_base"], abs=1e-12)
    assert rows["baseline"]["forgetting"] == 0.0 and rows["baseline"]["topic_accuracy_delta"] == 0.0
    # Training moved every trained model's loss on the general text (by how much is not under test).
    assert all(rows[name]["forgetting"] != 0.0 for name in ("full", "lora", "ia3"))
    assert "Forgetting (change of the mean per-token loss" in report["conclusion"]
    assert "forgetting (Δ general loss)" in (out / "report.md").read_text()


def test_report_markdown_plots_and_examples(compared, work):
    _, out, report = compared
    md = (out / "report.md").read_text()
    for name in ("baseline", "full", "lora", "ia3"):
        assert f"| {name} |" in md
    assert report["conclusion"] and report["conclusion"] in md
    best = max((m for m in report["methods"] if m["method"] != "baseline"), key=lambda m: m["rougeL"])
    assert report["conclusion"].startswith(f"Best ROUGE-L: {best['name']} with {100 * best['rougeL']:.2f}")
    assert report["plots"] == ["quality_vs_params.png", "costs.png", "gain_vs_forgetting.png"]
    for plot in report["plots"]:
        data = (out / plot).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
        assert f"![{plot}]({plot})" in md
    # Example predictions: the first rows, every entry's prediction as in its predictions.jsonl.
    assert [e["row"] for e in report["examples"]] == [1, 2]
    lora_predictions = [json.loads(line) for line in (out / "runs" / "lora" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert report["examples"][0]["predictions"]["lora"] == lora_predictions[0]["prediction"]
    assert len(report["examples"][0]["references"]) == 2 and report["examples"][0]["references"][0] in md


def test_a_failing_method_is_reported_and_the_others_still_run(work, capsys):
    # BitFit trains biases; Llama has none, so its training fails. lora after it must still run.
    out = work["root"] / "failing"
    code = main(["compare", "--model", work["llama"], "--train-data", work["train"], "--eval-data", work["eval"],
                 "--output", str(out), "--methods", "baseline,bitfit,lora", "--max-steps", "2", "--eval-limit", "4",
                 "--max-new-tokens", "4", "--latency-rows", "1", "--precision", "fp32", "--no-isolate",
                 "--max-source-tokens", "48", *OFF_FLAGS])
    assert code == 1  # the command says that something failed
    rows = by_name(report_of(out))
    assert rows["bitfit"]["status"] == "failed" and "selects no parameter" in rows["bitfit"]["error"]
    assert rows["bitfit"]["rouge1_delta"] is None
    assert rows["baseline"]["status"] == rows["lora"]["status"] == "ok"
    assert "bitfit failed" in report_of(out)["conclusion"]
    printed = capsys.readouterr().out
    assert "| bitfit | failed |" in printed and "report.md" in printed


def test_a_worker_process_that_dies_is_a_failed_entry(work, tmp_path):
    cfg = settings(work, tmp_path)
    entry = cfg.entries()[0]
    run_dir = tmp_path / "runs" / entry.name
    run_dir.mkdir(parents=True)
    spec = entry_spec(cfg, entry, {"eval": file_identity(cfg.eval_data)})
    (run_dir / "spec.json").write_text("{ not json")  # the worker process crashes before it can write a result
    result = _execute(run_dir, spec, isolate=True)
    assert result["status"] == "failed" and "exited with code" in result["error"]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "failed"


def test_resume_reuses_finished_entries_and_reruns_changed_ones(work, tmp_path, monkeypatch, capsys):
    trained = []
    real_train = loop_module.train

    def counting_train(cfg):
        trained.append((cfg.method, cfg.lr))
        return real_train(cfg)

    monkeypatch.setattr(worker_module, "train", counting_train)
    run_experiment(settings(work, tmp_path, methods=["baseline", "lora"]))
    assert trained == [("lora", get_preset("lora").default_lr)]
    first = by_name(report_of(tmp_path))

    # The same command again: nothing trains, the report is the same.
    run_experiment(settings(work, tmp_path, methods=["baseline", "lora"]))
    assert len(trained) == 1
    again = by_name(report_of(tmp_path))
    assert again["lora"]["rougeL"] == first["lora"]["rougeL"] and again["lora"]["train_time_s"] == first["lora"]["train_time_s"]
    assert "finished earlier with the same settings" in capsys.readouterr().out

    # Extended with another method: only the new one runs.
    run_experiment(settings(work, tmp_path, methods=["baseline", "lora", "ia3"]))
    assert [m for m, _ in trained] == ["lora", "ia3"]

    # lora's learning rate changes: lora runs again (and says why); baseline and ia3 are reused.
    run_experiment(settings(work, tmp_path, methods=["baseline", "lora", "ia3"], per_method=["lora.lr=1e-2"]))
    assert trained[-1] == ("lora", 1e-2) and len(trained) == 3
    assert "train.lr: 0.001 -> 0.01" in capsys.readouterr().out
    assert by_name(report_of(tmp_path))["lora"]["lr"] == 1e-2

    # A change every entry depends on (the evaluation rows) reruns all of them, the baseline too.
    run_experiment(settings(work, tmp_path, methods=["baseline", "lora", "ia3"], per_method=["lora.lr=1e-2"], eval_limit=5))
    assert len(trained) == 5
    assert all(m["eval_examples"] == 5 for m in report_of(tmp_path)["methods"])


def test_an_edited_data_file_is_noticed(work, tmp_path, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_text(Path(work["train"]).read_text())
    calls = []
    monkeypatch.setattr(worker_module, "train", lambda cfg: calls.append(cfg) or loop_module.train(cfg))
    run_experiment(settings(work, tmp_path / "out", methods=["lora"], train_data=str(data), latency_rows=0))
    data.write_text("".join(Path(work["train"]).read_text().splitlines(keepends=True)[:20]))  # same name, new content
    run_experiment(settings(work, tmp_path / "out", methods=["lora"], train_data=str(data), latency_rows=0))
    assert len(calls) == 2


def test_an_interrupted_entry_keeps_its_finished_stages(work, tmp_path, monkeypatch):
    cfg = settings(work, tmp_path, methods=["lora"], latency_rows=0)
    run_experiment(cfg)
    (tmp_path / "runs" / "lora" / "result.json").unlink()  # as if killed after training and evaluation
    monkeypatch.setattr(worker_module, "train", lambda cfg: pytest.fail("trained again"))
    monkeypatch.setattr(worker_module, "evaluate", lambda cfg: pytest.fail("evaluated again"))
    assert by_name(run_experiment(cfg))["lora"]["status"] == "ok"


def test_rank_sweep(work, tmp_path):
    cfg = settings(work, tmp_path, SweepConfig, ranks=[2, 4], target_module_sets=["q_proj", "q_proj+v_proj"], latency_rows=0)
    report = run_experiment(cfg, kind="sweep")
    rows = by_name(report)
    assert list(rows) == ["baseline", "lora-r2-q_proj", "lora-r4-q_proj", "lora-r2-q_proj+v_proj", "lora-r4-q_proj+v_proj"]
    # r x (in + out) per adapted layer; q_proj is 32 -> 32, v_proj 32 -> 16; 2 layers.
    for rank in (2, 4):
        assert rows[f"lora-r{rank}-q_proj"]["trainable_params"] == 2 * rank * 64
        assert rows[f"lora-r{rank}-q_proj+v_proj"]["trainable_params"] == 2 * rank * (64 + 48)
        assert rows[f"lora-r{rank}-q_proj"]["method_options"]["lora_alpha"] == 2 * rank  # the same scale at every rank
    assert report["plots"] == ["quality_vs_params.png", "costs.png", "gain_vs_forgetting.png", "rank_sweep.png"]
    assert (tmp_path / "rank_sweep.png").read_bytes().startswith(PNG)


def test_sweep_command_line(work, tmp_path, capsys):
    code = main(["sweep", "--model", work["llama"], "--train-data", work["train"], "--eval-data", work["eval"],
                 "--output", str(tmp_path), "--ranks", "1,2", "--no-baseline", "--max-steps", "1", "--eval-limit", "2",
                 "--max-new-tokens", "2", "--latency-rows", "0", "--example-rows", "0", "--precision", "fp32",
                 "--no-isolate", "--max-source-tokens", "48", *OFF_FLAGS, "--auto", "--tolerance", "100"])
    assert code == 0
    report = report_of(tmp_path)
    assert [m["name"] for m in report["methods"]] == ["lora-r1", "lora-r2"]
    # Every rank is within 100 points of the best: the smallest is chosen.
    assert report["rank_choice"]["chosen"] == "lora-r1" and report["rank_choice"]["tolerance"] == 1.0
    printed = capsys.readouterr().out
    assert "| lora-r2 |" in printed and "Rank chosen: r = 1 (lora-r1" in printed
    assert "Rank chosen: r = 1" in (tmp_path / "report.md").read_text()


def test_rank_choice_is_the_cheapest_rank_within_the_tolerance_of_the_best():
    def row(rank, score, params, **kw):
        return {"name": f"lora-r{rank}", "method": "lora", "status": "ok", "method_options": {"r": rank}, "rougeL": score,
                "trainable_params": params, "stored_bytes": 4 * params, "train_time_s": rank / 10, "forgetting": rank / 1000,
                "run_dir": f"runs/lora-r{rank}", **kw}

    rows = [{"name": "baseline", "method": "baseline", "status": "ok", "method_options": {}, "rougeL": 0.5},
            row(2, 0.300, 100), row(4, 0.331, 200), row(8, 0.335, 400), row(16, 0.340, 800),
            {"name": "lora-r32", "method": "lora", "status": "failed"}]
    choice = rank_choice(rows, tolerance=0.01)
    assert (choice["chosen"], choice["best"]) == ("lora-r4", "lora-r16")  # 0.331 >= 0.340 - 0.01; 0.300 is not
    assert choice["params_saved"] == 600 and choice["params_fraction"] == 0.25 and choice["stored_bytes_saved"] == 2400
    assert choice["train_time_saved_s"] == pytest.approx(1.2) and choice["chosen_adapter"] == "runs/lora-r4/train"
    assert (choice["forgetting_chosen"], choice["forgetting_best"]) == (0.004, 0.016)
    assert "within 1 point of the best, r = 16" in rank_choice_sentence(choice)
    assert rank_choice(rows, tolerance=0.0)["chosen"] == "lora-r16"
    assert "the best, and no smaller rank" in rank_choice_sentence(rank_choice(rows, tolerance=0.0))
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        SweepConfig(tolerance=-1)


# --- settings that are refused before anything runs --------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    ({"methods": ["baseline", "lorra"]}, "Unknown method 'lorra'"),
    ({"methods": ["lora", "lora"]}, "more than once"),
    ({"methods": []}, "empty"),
    ({"per_method": ["lora.rank16"]}, "NAME.KEY=VALUE"),
    ({"methods": ["lora", "a b=lora"]}, "NAME=METHOD"),
    ({"methods": ["lora", "lora2=lorra"]}, "Unknown method 'lorra'"),
    ({"per_method": ["ia3.lr=1e-3"]}, "not in --methods"),
    ({"per_method": ["full.r=4"]}, "full does not take 'r'"),
    ({"per_method": ["baseline.lr=1e-3"]}, "baseline trains nothing"),
    ({"per_method": ["lora.lr=-1"]}, "must be > 0"),
    ({"num_virtual_tokens": 4}, "used by none of the entries"),
    ({"lora.r": 4}, "settings of one method go in per_method"),
    ({"latency_rows": -1}, "latency_rows must be"),
    ({"max_new_tokens": 0}, "max_new_tokens must be"),
    ({"batch_size": 0}, "batch_size must be"),
])
def test_bad_settings_are_refused(kw, message):
    options = {k: v for k, v in kw.items() if k in ("num_virtual_tokens", "lora.r")}
    rest = {k: v for k, v in kw.items() if k not in options}
    base = {"methods": ["baseline", "full", "lora"], "train_data": "t.jsonl", "eval_data": "e.jsonl", "output": "o"}
    with pytest.raises(ValueError, match=message):
        if options:
            build_experiment_config(CompareConfig, None, None, **base, **options)
        else:
            build_experiment_config(CompareConfig, **{**base, **rest})


def test_missing_data_or_output_is_refused():
    with pytest.raises(ValueError, match="Missing --train-data"):
        CompareConfig(eval_data="e.jsonl", output="o").check_required()
    CompareConfig(methods=["baseline"], eval_data="e.jsonl", output="o").check_required()  # the baseline trains nothing


def test_per_method_settings_from_yaml_and_the_command_line(tmp_path):
    yaml_file = tmp_path / "cmp.yaml"
    yaml_file.write_text("methods: [baseline, lora, prompt_tuning]\nmax_steps: 30\nper_method:\n  lora: {r: 16, lr: 5e-4, "
                         "target_modules: [q_proj, v_proj]}\n  prompt_tuning: {num_virtual_tokens: 8}\n")
    cfg = build_experiment_config(CompareConfig, str(yaml_file), ["eval_limit=10"], train_data="t", eval_data="e", output="o")
    lora, prompt = cfg.entries()[1:]
    assert (lora.options["r"], lora.lr, lora.options["target_modules"]) == (16, 5e-4, ["q_proj", "v_proj"])
    assert prompt.options["num_virtual_tokens"] == 8 and prompt.lr == get_preset("prompt_tuning").default_lr
    assert cfg.training.max_steps == 30 and cfg.eval_limit == 10
    # On the command line a list value keeps its commas.
    cfg = CompareConfig(methods=["lora"], per_method=["lora.target_modules=q_proj", "k_proj", "lora.r=2"])
    assert cfg.entries()[0].options == {"target_modules": ["q_proj", "k_proj"], "r": 2}
    # Two settings of one method, under their own names.
    cfg = CompareConfig(methods=["lora", "lora_all=lora"], per_method=["lora_all.target_modules=all-linear", "lora_all.lr=1e-3"])
    (lora, lora_all) = cfg.entries()
    assert (lora.name, lora.method, lora.options) == ("lora", "lora", {})
    assert (lora_all.name, lora_all.method, lora_all.options, lora_all.lr) == ("lora_all", "lora", {"target_modules": "all-linear"}, 1e-3)
    # A shared option goes to the methods that use it only.
    cfg = CompareConfig(methods=["full", "lora", "ia3"], method_options={"r": 32, "target_modules": ["q_proj"]})
    full, lora, ia3 = cfg.entries()
    assert (full.options, lora.options, ia3.options) == ({}, {"r": 32, "target_modules": ["q_proj"]}, {"target_modules": ["q_proj"]})


def test_train_uses_the_methods_default_lr_when_none_is_given(work, tmp_path):
    from peftkit.train import TrainConfig, train

    cfg = TrainConfig(model=work["llama"], data=work["train"], output=str(tmp_path), method="ia3", max_steps=1,
                      precision="fp32", format=PromptFormat(max_source_tokens=48))
    assert train(cfg)["lr"] == get_preset("ia3").default_lr != get_preset("lora").default_lr


def test_peak_memory_is_the_runs_own(tmp_path):
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc")
    import torch

    big = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    before = loop_module.peak_memory(torch.device("cpu"))["peak_rss_mb"]
    del big
    loop_module.reset_peak_memory()
    after = loop_module.peak_memory(torch.device("cpu"))["peak_rss_mb"]
    assert after < before - 32  # the 64 MB peak is forgotten after the reset


def test_a_comparison_shares_peftkit_trains_settings(tmp_path):
    """The training section is a TrainConfig: every entry's config is it plus the entry's data, method and lr."""
    yaml_file = tmp_path / "cmp.yaml"
    yaml_file.write_text("methods: [lora, ia3]\nmax_steps: 7\nformat: {max_source_tokens: 99}\ntraining: {seed: 3}\n")
    cfg = build_experiment_config(CompareConfig, str(yaml_file), ["target_only_logits=false"], train_data="t", eval_data="e",
                                  output="o", r="4")
    lora = cfg.train_config(cfg.entries()[0], "out/lora")
    assert lora == TrainConfig(model=cfg.training.model, data="t", output="out/lora", method="lora", method_options={"r": 4},
                               max_steps=7, seed=3, target_only_logits=False, lr=get_preset("lora").default_lr,
                               format=PromptFormat(max_source_tokens=99))
    assert cfg.eval_config("x").format.max_source_tokens == 99  # evaluation reads the prompt training used
    with pytest.raises(ValueError, match="training.eval_data cannot be set in a comparison"):
        build_experiment_config(CompareConfig, sets=["training.eval_data=x.jsonl"])
