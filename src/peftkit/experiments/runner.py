"""Run every entry of a comparison, each in its own folder, then write the report.

    OUTPUT/runs/<entry>/spec.json     what the entry runs, and its fingerprint
    OUTPUT/runs/<entry>/...           its adapter, logs and evaluation (see worker.py)
    OUTPUT/runs/<entry>/result.json   its numbers, or its error
    OUTPUT/report.json, report.md, *.png

Running the same command again reuses every entry that finished with the same fingerprint: the
settings that decide its result (model, the data files' contents, method, options, learning rate, the
training budget, the evaluation rows and generation settings). An entry whose settings changed runs
again from scratch, and the reason is printed; one that failed or was interrupted runs again, reusing
its finished stages (a trained adapter, a finished evaluation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..evaluate import check_available
from ..io.files import atomic_write_text
from ..options import setting_changes
from .config import Entry, ExperimentConfig
from .report import build_report, write_report
from .worker import RESULT, SPEC, failed_result, run_entry, scored_otherwise

# Settings that change how a run is logged or resumed, never its result.
_NOT_IN_FINGERPRINT = {"output", "report_to", "log_every", "save_every", "keep_checkpoints", "resume", "eval_data", "eval_every", "eval_limit"}


def run_experiment(cfg: ExperimentConfig, kind: str = "compare") -> dict[str, Any]:
    """Run (or reuse) every entry of ``cfg`` and write the report; returns ``report.json``'s content."""
    cfg.check_required()
    check_available(cfg.scoring.metrics)  # a missing metric library fails now, not after the training
    entries = cfg.entries()
    output = Path(cfg.output)
    started = time.perf_counter()
    data = {"eval": file_identity(cfg.eval_data)}
    if any(e.trains for e in entries):
        data["train"] = file_identity(cfg.train_data)
    budget = cfg.training
    steps = f"{budget.max_steps} steps" if budget.max_steps else f"{budget.epochs:g} epoch(s)"
    rows = f"the first {cfg.eval_limit} rows" if cfg.eval_limit else "all rows"
    _say(f"{len(entries)} entries ({', '.join(e.name for e in entries)}) -> {output}/; training budget {steps} x "
         f"{budget.batch_size * budget.grad_accum} examples each; scoring {rows} of {cfg.eval_data}")

    results: list[dict[str, Any]] = []
    took: dict[str, tuple[float, bool]] = {}  # entry name -> (seconds, trained) for the entries run here
    for number, entry in enumerate(entries, 1):
        tag = f"[{number}/{len(entries)}] {entry.name}"
        run_dir = output / "runs" / entry.name
        spec = entry_spec(cfg, entry, data)
        previous = _previous(run_dir, spec)
        if previous in ("finished", "unmeasured") and scored_otherwise(run_dir / "eval" / "metrics.json", spec["eval"]):
            _say(f"{tag}: finished earlier; the metrics or reference mode changed, so it is scored again (nothing retrains)")
            (run_dir / RESULT).unlink()
            previous = "rescore"
        elif previous == "unmeasured":
            _say(f"{tag}: finished earlier with the same settings; measuring its forgetting (the other stages are reused)")
            (run_dir / RESULT).unlink()
        if previous == "finished":
            _say(f"{tag}: finished earlier with the same settings; reusing {run_dir}")
            results.append(json.loads((run_dir / RESULT).read_text(encoding="utf-8")))
            continue
        if previous.startswith("changed"):
            _say(f"{tag}: settings {previous}; discarding the earlier run and starting again")
            shutil.rmtree(run_dir)
        elif previous == "failed":
            _say(f"{tag}: failed last time; trying again (finished stages are kept)")
            (run_dir / RESULT).unlink()
        elif previous == "interrupted":
            _say(f"{tag}: continuing an interrupted run (finished stages are kept)")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / SPEC, json.dumps(spec, indent=2) + "\n")

        what = f"train ({entry.method}, lr {entry.lr:g}), evaluate, time" if entry.trains else "zero-shot evaluation, time"
        _say(f"{tag}: {what}; elapsed {_clock(time.perf_counter() - started)}{_eta(entries[number - 1:], took)}")
        entry_started = time.perf_counter()
        result = _execute(run_dir, spec, cfg.isolate)
        seconds = time.perf_counter() - entry_started
        took[entry.name] = (seconds, entry.trains)
        if result["status"] == "ok":
            _say(f"{tag}: done in {_clock(seconds)}: ROUGE-1 {100 * result['rouge1']:.2f}, ROUGE-L {100 * result['rougeL']:.2f}")
        else:
            _say(f"{tag}: FAILED after {_clock(seconds)}: {result['error']}")
        results.append(result)

    report = build_report(cfg, kind, entries, results, wall_time_s=time.perf_counter() - started)
    write_report(output, report, entries)
    return report


def entry_spec(cfg: ExperimentConfig, entry: Entry, data: dict[str, Any]) -> dict[str, Any]:
    """What the worker runs (``spec.json``): the training and evaluation configs, and the fingerprint."""
    train = dataclasses.asdict(cfg.train_config(entry, "")) if entry.trains else None
    if train is not None:
        train["output"] = ""  # the worker sets it; the folder may move with the comparison
    evaluation = dataclasses.asdict(cfg.eval_config(""))
    fingerprint: dict[str, Any] = {
        "method": entry.method,
        "model": cfg.model,
        "eval_data": data["eval"],
        # The metrics are not in it: scoring other metrics re-evaluates a finished entry, it does not retrain it.
        # check_values only refuses broken adapters; it changes no result, so finished entries stay valid.
        "eval": {k: v for k, v in evaluation.items() if k not in ("output", "data", "model", "adapter", "scoring", "check_values")}
        | {"limit": cfg.eval_limit},
        "latency_rows": cfg.latency_rows,
    }
    if train is not None:
        fingerprint["train_data"] = data["train"]
        fingerprint["train"] = {k: v for k, v in train.items() if k not in _NOT_IN_FINGERPRINT and k not in ("data", "model")}
    # Forgetting is measured after the rest and is not in the fingerprint: changing how it is measured
    # re-measures it on the trained entries instead of training them again.
    spec = {"entry": dataclasses.asdict(entry), "model": cfg.model, "train": train, "eval": evaluation,
            "latency_rows": cfg.latency_rows, "forgetting": dataclasses.asdict(cfg.forgetting), "threads": cfg.threads,
            "fingerprint": fingerprint}
    return json.loads(json.dumps(spec))  # as it reads back from spec.json (tuples become lists), so comparisons hold


def file_identity(path: str) -> dict[str, Any]:
    """A data file's identity by content (size and SHA-256), so an edited file is noticed; a hub dataset id as is."""
    p = Path(path)
    if not p.is_file():
        return {"id": path}
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": p.stat().st_size, "sha256": digest.hexdigest()}


def fingerprint_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``["train.lr: 0.0002 -> 0.0005", ...]``: the settings that differ."""
    return setting_changes(before, now)


def _previous(run_dir: Path, spec: dict[str, Any]) -> str:
    """``new``, ``finished``, ``unmeasured`` (finished, but forgetting measured otherwise or not at all),
    ``failed``, ``interrupted`` (same settings), or ``changed (...)``."""
    fingerprint = spec["fingerprint"]
    if not (run_dir / SPEC).is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            return "changed (the folder holds no spec.json)"
        return "new"
    before = json.loads((run_dir / SPEC).read_text(encoding="utf-8"))["fingerprint"]
    changes = fingerprint_changes(before, fingerprint)
    if changes:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        return f"changed ({shown})"
    if not (run_dir / RESULT).is_file():
        return "interrupted"
    result = json.loads((run_dir / RESULT).read_text(encoding="utf-8"))
    if result["status"] != "ok":
        return "failed"
    return "finished" if result.get("forgetting_settings") == spec["forgetting"] else "unmeasured"


def _execute(run_dir: Path, spec: dict[str, Any], isolate: bool) -> dict[str, Any]:
    if not isolate:
        return run_entry(run_dir)
    sys.stdout.flush()
    code = subprocess.run([sys.executable, "-m", "peftkit.experiments", str(run_dir)], env=dict(os.environ)).returncode
    if (run_dir / RESULT).is_file():
        return json.loads((run_dir / RESULT).read_text(encoding="utf-8"))
    result = failed_result(spec, f"the worker process exited with code {code} before writing its result "
                                 "(killed, or out of memory?); its output is above")
    atomic_write_text(run_dir / RESULT, json.dumps(result, indent=2) + "\n")
    return result


def _eta(remaining: list[Entry], took: dict[str, tuple[float, bool]]) -> str:
    """A rough estimate from the entries run so far in this invocation (trained and not trained apart)."""
    if not took:
        return ""
    trained = [s for s, trains in took.values() if trains]
    untrained = [s for s, trains in took.values() if not trains]
    per_trained = sum(trained) / len(trained) if trained else 3 * max(untrained)  # no trained entry yet: a guess
    per_untrained = sum(untrained) / len(untrained) if untrained else per_trained / 3
    left = sum(per_trained if e.trains else per_untrained for e in remaining)
    return f"; about {_clock(left)} left (estimated from the entries so far)"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def _say(message: str) -> None:
    print(f"peftkit compare: {message}", flush=True)
