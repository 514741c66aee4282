"""One entry of a comparison, start to finish, in its own folder: ``python -m peftkit.experiments RUN_DIR``.

``RUN_DIR/spec.json`` (written by the runner) says what to run. The stages write into the folder:

    RUN_DIR/train/         the adapter (or the whole model), tokenizer, run.json, train_log.jsonl  (peftkit.train)
    RUN_DIR/eval/          metrics.json, predictions.jsonl                                          (peftkit.evaluate)
    RUN_DIR/latency.json   parameter count and per-example generation latency                       (latency.py)
    RUN_DIR/forgetting.json  general-text loss and untrained-task accuracy, before and after  (evaluate/forgetting.py)
    RUN_DIR/result.json    written last: status "ok" with every number of the report, or "failed" with the error

The base model's own forgetting scores are computed once per comparison and kept in
``OUTPUT/forgetting_base.json`` (with the model, settings and device they were measured with).
A stage whose output is already there (same spec, an interrupted earlier attempt) is not run again.
The runner calls :func:`run_entry` in a fresh process (``isolate``) or in its own.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..evaluate import EvalConfig, eval_format, evaluate, load_for_inference, score_fields
from ..evaluate.forgetting import ForgettingSettings, forgetting, general_scores
from ..io.files import atomic_write_text
from ..train import TrainConfig, train
from ..train.checkpoint import latest_checkpoint
from .config import from_dict
from .latency import measure_latency

SPEC, RESULT = "spec.json", "result.json"
FORGETTING, FORGETTING_BASE = "forgetting.json", "forgetting_base.json"
# What must be kept per task to use the result: an adapter's two files, or a whole model's weights and
# configs. The tokenizer is the base model's, shared by every task, and logs are not needed to use it.
STORED_NAMES = {"adapter_model.safetensors", "adapter_config.json", "config.json", "generation_config.json"}
STORED_SUFFIXES = (".safetensors", ".safetensors.index.json")


def stored_files(train_dir: Path) -> dict[str, int]:
    """``{file name: bytes}`` of what a task needs on disk (see ``STORED_NAMES``)."""
    return {p.name: p.stat().st_size for p in sorted(train_dir.iterdir())
            if p.is_file() and (p.name in STORED_NAMES or p.name.endswith(STORED_SUFFIXES))}


def run_entry(run_dir: Path) -> dict[str, Any]:
    """Run the entry described in ``run_dir/spec.json``; always writes ``result.json`` and returns it."""
    run_dir = Path(run_dir)
    spec = json.loads((run_dir / SPEC).read_text(encoding="utf-8"))
    name = spec["entry"]["name"]
    started = time.perf_counter()
    try:
        result = _run(spec, run_dir, name)
    except Exception as e:  # noqa: BLE001  (any failure of this entry is reported, the others still run)
        print(f"peftkit compare: {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        result = failed_result(spec, f"{type(e).__name__}: {e}", traceback.format_exc())
    result["entry_wall_time_s"] = time.perf_counter() - started
    atomic_write_text(run_dir / RESULT, json.dumps(result, indent=2) + "\n")
    return result


def failed_result(spec: dict[str, Any], error: str, details: str | None = None) -> dict[str, Any]:
    entry = spec["entry"]
    return {"name": entry["name"], "method": entry["method"], "status": "failed", "error": error,
            "traceback": details, "lr": entry["lr"], "fingerprint": spec["fingerprint"]}


def _run(spec: dict[str, Any], run_dir: Path, name: str) -> dict[str, Any]:
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    entry = spec["entry"]
    say = lambda msg: print(f"peftkit compare: {name}: {msg}", flush=True)  # noqa: E731

    # --- train (nothing for the baseline) ------------------------------------------------------------
    run: dict[str, Any] | None = None
    train_dir = run_dir / "train"
    if spec["train"] is not None:
        if not (train_dir / "run.json").is_file():
            cfg = from_dict(TrainConfig, spec["train"])
            cfg.output = str(train_dir)
            cfg.resume = latest_checkpoint(train_dir) is not None
            steps = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs:g} epoch(s)"
            say(f"training {steps} of {cfg.batch_size * cfg.grad_accum} examples, lr {cfg.lr:g}"
                + (" (resuming from its last checkpoint)" if cfg.resume else ""))
            train(cfg)
        run = json.loads((train_dir / "run.json").read_text(encoding="utf-8"))

    # --- evaluate: the same rows and generation settings for every entry ------------------------------
    model, adapter = spec["model"], None
    if run is not None:
        model, adapter = (str(train_dir), None) if run["saves_full_model"] else (spec["model"], str(train_dir))
    eval_dir = run_dir / "eval"
    if scored_otherwise(eval_dir / "metrics.json", spec["eval"]):
        say("the metrics or reference mode changed; evaluating again (the training is kept)")
        (eval_dir / "metrics.json").unlink()
    if not (eval_dir / "metrics.json").is_file():
        cfg = from_dict(EvalConfig, spec["eval"])
        cfg.model, cfg.adapter, cfg.output = model, adapter, str(eval_dir)
        say(f"generating and scoring {'the first ' + str(cfg.limit) if cfg.limit else 'all'} rows of {cfg.data}")
        evaluate(cfg)
    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))

    # --- latency and parameter count ------------------------------------------------------------------
    latency_path = run_dir / "latency.json"
    if not latency_path.is_file():
        rows = spec["latency_rows"]
        if rows:
            say(f"timing generation on {rows} rows, one at a time" + (" (unmerged and merged)" if adapter else ""))
        ev = from_dict(EvalConfig, spec["eval"])
        fmt = eval_format(ev.format, adapter, model, ev.override_training_format)[0]  # the prompts evaluation used
        latency = measure_latency(model, adapter, ev.data, fmt, ev.generation, rows, cpu=ev.cpu)
        atomic_write_text(latency_path, json.dumps(latency, indent=2) + "\n")
    latency = json.loads(latency_path.read_text(encoding="utf-8"))

    # --- forgetting: held-out general text and an untrained task, base model against this one ---------
    settings = spec.get("forgetting") or {}
    measured = _read_json(run_dir / FORGETTING)
    if measured is None or measured["settings"] != settings:
        measured = {"settings": settings, **measure_forgetting(spec, run_dir.parent.parent / FORGETTING_BASE, model, adapter, say)}
        atomic_write_text(run_dir / FORGETTING, json.dumps(measured, indent=2) + "\n")
    result = ok_result(spec, run, metrics, latency, stored_files(train_dir) if run is not None else {})
    return {**result, **{k: v for k, v in measured.items() if k != "settings"}, "forgetting_settings": settings}


def measure_forgetting(spec: dict[str, Any], base_cache: Path, model: str, adapter: str | None, say) -> dict[str, Any]:
    """The report's forgetting numbers of ``model`` (+ ``adapter``) against ``spec["model"]`` before training."""
    import torch

    settings = from_dict(ForgettingSettings, spec.get("forgetting") or {})
    if not settings.enabled:
        return forgetting(*[{"general_loss": None, "topic_accuracy": None}] * 2)
    cpu = spec["eval"].get("cpu", False)
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    batch = spec["eval"]["generation"]["batch_size"]
    key = {"model": spec["model"], "settings": spec["forgetting"], "device": device.type}
    cached = _read_json(base_cache)
    if cached is not None and cached["key"] == key:
        before = cached["scores"]
    else:
        say(f"scoring the base model on {settings.general_texts} general texts and {settings.topic_rows} topic rows")
        net, tokenizer, _ = load_for_inference(spec["model"], None, device)
        before = general_scores(net, tokenizer, settings, batch)
        atomic_write_text(base_cache, json.dumps({"key": key, "scores": before}, indent=2) + "\n")
    if adapter is None and model == spec["model"]:
        return forgetting(before, before)  # the base model itself (the zero-shot baseline)
    say("measuring forgetting: general-text loss and zero-shot topic accuracy with the trained weights")
    net, tokenizer, _ = load_for_inference(model, adapter, device)
    return forgetting(before, general_scores(net, tokenizer, settings, batch))


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def scored_otherwise(metrics_path: Path, evaluation: dict[str, Any]) -> bool:
    """True when an existing evaluation used other metrics or another reference mode than ``evaluation``'s."""
    if not metrics_path.is_file():
        return False
    return json.loads(metrics_path.read_text(encoding="utf-8")).get("scoring") != evaluation.get("scoring")


def ok_result(spec: dict[str, Any], run: dict[str, Any] | None, metrics: dict[str, Any], latency: dict[str, Any],
              stored: dict[str, int]) -> dict[str, Any]:
    """The entry's numbers, before the comparison with the baseline (see ``report.REPORT_FIELDS``)."""
    entry = spec["entry"]
    unmerged, merged = latency.get("unmerged") or {}, latency.get("merged") or {}
    trainable = run["trainable_params"] if run else 0
    total = run["total_params"] if run else latency["total_params"]
    return {
        "name": entry["name"],
        "method": entry["method"],
        "status": "ok",
        "error": None,
        "lr": run["lr"] if run else None,
        "method_options": entry["options"] if run else {},
        "reference_mode": metrics["reference_mode"],
        **{k: metrics.get(k) for k in score_fields()},  # null where the metric was not chosen
        "eval_examples": metrics["n"],
        "eval_examples_per_s": metrics["examples_per_s"],
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "saves_full_model": bool(run and run["saves_full_model"]),
        "train_steps": run["steps"] if run else None,
        "train_examples_seen": run["steps"] * run["config"]["batch_size"] * run["config"]["grad_accum"] * run["processes"] if run else None,
        "final_train_loss": run["final_loss"] if run else None,
        "peak_train_memory_mb": run["peak_rss_mb"] if run else None,
        "peak_train_gpu_memory_mb": run["peak_gpu_memory_mb"] if run else None,
        "train_time_s": run["train_time_s"] if run else None,
        "train_tokens_per_s": run["train_tokens_per_s"] if run else None,
        "precision": metrics["precision"],
        "stored_bytes": sum(stored.values()),
        "stored_files": stored,
        "latency_rows": latency["rows"],
        "latency_s_per_example": unmerged.get("s_per_example"),
        "latency_ms_per_token": unmerged.get("ms_per_token"),
        "latency_new_tokens_per_example": unmerged.get("new_tokens_per_example"),
        "latency_merged_s_per_example": merged.get("s_per_example"),
        "latency_merged_ms_per_token": merged.get("ms_per_token"),
        "fingerprint": spec["fingerprint"],
    }

