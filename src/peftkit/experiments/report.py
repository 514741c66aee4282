"""The comparison report: ``report.json`` (one object per entry, fields in :data:`REPORT_FIELDS`),
``report.md`` (the table, a conclusion computed from the numbers, example predictions) and the plots.

ROUGE values are fractions in [0, 1] in ``report.json`` and points (x 100) in ``report.md``. A delta is
the entry's score minus the zero-shot baseline's, in the same unit; it is ``null`` without a baseline.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..data import load_examples
from ..evaluate import METRICS, REFERENCE_MODES, ROUGE_TYPES, metric_keys, score_fields
from ..io.files import atomic_write_text
from .config import BASELINE, Entry, ExperimentConfig

HEADLINE = "rougeL"  # the metric the conclusion and the sorted views use
ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}

def _about(key: str) -> str:
    metric = next(m for m in METRICS.values() if key in m.keys)
    what = f"{ROUGE_NAMES[key]} F-measure" if key in ROUGE_NAMES else metric.about
    return f"{what} ({metric.library}), mean over the evaluation rows" if metric.per_row else f"{what} ({metric.library})"


REPORT_FIELDS: dict[str, str] = {
    "name": "the entry's label (its sub-folder is runs/<name>)",
    "method": "the method preset, or 'baseline' (the frozen base model, zero-shot)",
    "status": "'ok', or 'failed' (then 'error' says why and most numbers are absent)",
    "error": "the error of a failed entry, else null",
    "lr": "peak learning rate used (null for the baseline)",
    "method_options": "the method options the entry set (r, target_modules, ...: the config's field names)",
    "reference_mode": "how an example with several references was scored for the headline numbers: max (its best "
                      "reference), mean (each reference its own row, averaged) or first",
    **{k: f"{_about(k)}, under reference_mode (null when not in --metrics)" for k in metric_keys()},
    **{f"{k}_{mode}": f"the same under reference mode {mode}" for mode in REFERENCE_MODES for k in score_fields()
       if k in metric_keys() and f"{k}_{mode}" in score_fields()},
    **{f"{k}_delta": f"{k} minus the baseline's (null without a baseline)" for k in metric_keys()},
    "eval_examples": "rows scored",
    "eval_examples_per_s": "batched evaluation throughput (generation only)",
    "trainable_params": "parameters trained (0 for the baseline)",
    "total_params": "all parameters of the model as trained (base model plus adapter)",
    "trainable_percent": "100 x trainable_params / total_params",
    "saves_full_model": "true when the result is a whole model (full fine-tuning), not an adapter",
    "train_steps": "optimizer steps run",
    "train_examples_seen": "train_steps x examples per step",
    "final_train_loss": "training loss of the last step",
    "peak_train_memory_mb": "peak resident memory (RSS) of the training, in MB (from the model load to the save)",
    "peak_train_gpu_memory_mb": "peak GPU memory allocated by PyTorch while training, in MB (null on a CPU)",
    "train_time_s": "training wall time in seconds (the steps, without loading or saving)",
    "train_tokens_per_s": "training tokens (prompt and target) per second",
    "precision": "arithmetic of the evaluation: bf16 (autocast) or fp32",
    "stored_bytes": "bytes on disk a task needs: the adapter's files, or the whole model's weights and config",
    "stored_files": "{file: bytes} counted in stored_bytes",
    "latency_rows": "rows generated one at a time for the latency figures",
    "latency_s_per_example": "seconds to generate one example alone (adapter attached, unmerged)",
    "latency_ms_per_token": "the same per generated token, in milliseconds",
    "latency_new_tokens_per_example": "tokens generated per example in the latency runs",
    "latency_merged_s_per_example": "seconds per example with the adapter merged into the weights (null if it cannot merge)",
    "latency_merged_ms_per_token": "the same per generated token, in milliseconds",
    "general_loss_base": "mean per-token loss of the base model before training on held-out general text (BBC News articles)",
    "general_loss": "the same for this entry's model (adapter on); null when forgetting is not measured",
    "forgetting": "general_loss minus general_loss_base, as PEFT's method comparison reports it: > 0 is forgetting",
    "topic_accuracy_base": "zero-shot topic accuracy of the base model on news articles (a task no entry trains on)",
    "topic_accuracy": "the same for this entry's model",
    "topic_accuracy_delta": "topic_accuracy minus topic_accuracy_base: < 0 is forgetting",
    "entry_wall_time_s": "wall time of the entry's last run: training, evaluation and latency together",
    "run_dir": "the entry's folder, relative to the report",
}


def build_report(cfg: ExperimentConfig, kind: str, entries: list[Entry], results: list[dict[str, Any]],
                 wall_time_s: float) -> dict[str, Any]:
    """``report.json``'s content: settings, one object per entry (with deltas), the conclusion, examples."""
    baseline = next((r for r in results if r["method"] == BASELINE and r["status"] == "ok"), None)
    methods = [method_row(r, baseline) for r in results]
    choice = rank_choice(methods, cfg.tolerance / 100) if getattr(cfg, "auto", False) else None
    return {
        "kind": kind,
        "peftkit_version": __version__,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "wall_time_s": wall_time_s,
        "entries_wall_time_s": sum(r.get("entry_wall_time_s") or 0 for r in results),
        "settings": settings(cfg, entries),
        "methods": methods,
        "conclusion": conclusion(methods),
        **({"rank_choice": choice} if choice is not None else {}),
        "examples": examples(cfg, methods),
    }


def rank_choice(methods: list[dict[str, Any]], tolerance: float) -> dict[str, Any] | None:
    """``sweep --auto``: the cheapest finished entry (fewest trainable parameters, then smallest rank) whose
    ROUGE-L is at least the best one's minus ``tolerance`` (a fraction), and what it saves against the best."""
    ranked = [m for m in methods if m["status"] == "ok" and m["method"] != BASELINE and "r" in m["method_options"]]
    if not ranked:
        return None
    best = max(ranked, key=lambda m: (m[HEADLINE], -m["trainable_params"]))
    within = [m for m in ranked if m[HEADLINE] >= best[HEADLINE] - tolerance - 1e-12]
    chosen = min(within, key=lambda m: (m["trainable_params"], m["method_options"]["r"]))

    def saved(key: str) -> float | None:
        return None if best.get(key) is None or chosen.get(key) is None else best[key] - chosen[key]

    return {
        "metric": HEADLINE,
        "tolerance": tolerance,
        "chosen": chosen["name"],
        "chosen_rank": chosen["method_options"]["r"],
        "chosen_score": chosen[HEADLINE],
        "chosen_adapter": f"{chosen['run_dir']}/train",
        "best": best["name"],
        "best_rank": best["method_options"]["r"],
        "best_score": best[HEADLINE],
        "params_saved": best["trainable_params"] - chosen["trainable_params"],
        "params_fraction": chosen["trainable_params"] / best["trainable_params"],
        "stored_bytes_saved": saved("stored_bytes"),
        "train_time_saved_s": saved("train_time_s"),
        "forgetting_chosen": chosen.get("forgetting"),
        "forgetting_best": best.get("forgetting"),
    }


def rank_choice_sentence(choice: dict[str, Any]) -> str:
    name = ROUGE_NAMES[choice["metric"]]
    points = 100 * choice["tolerance"]
    tolerance = f"{points:.2g} point{'' if points == 1 else 's'}"
    if choice["chosen"] == choice["best"]:
        return (f"Rank chosen: r = {choice['chosen_rank']} ({choice['chosen']}, {name} {_points(choice['chosen_score'])}): "
                f"the best, and no smaller rank comes within {tolerance} of it. Adapter: {choice['chosen_adapter']}.")
    text = (f"Rank chosen: r = {choice['chosen_rank']} ({choice['chosen']}, {name} {_points(choice['chosen_score'])}), within "
            f"{tolerance} of the best, r = {choice['best_rank']} ({choice['best']}, {_points(choice['best_score'])}); it trains "
            f"{100 * choice['params_fraction']:.3g}% of the best's parameters ({_count(choice['params_saved'])} fewer)")
    if choice["stored_bytes_saved"] is not None:
        text += f", stores {_size(choice['stored_bytes_saved'])} less per task"
    if choice["train_time_saved_s"] is not None:
        more = choice["train_time_saved_s"] < 0
        text += f" and trained in {_duration(abs(choice['train_time_saved_s']))} {'more' if more else 'less'} time (one noisy run)"
    if choice["forgetting_chosen"] is not None and choice["forgetting_best"] is not None:
        text += f"; forgetting {choice['forgetting_chosen']:+.4f} against {choice['forgetting_best']:+.4f}"
    return text + f". Adapter: {choice['chosen_adapter']}."


def method_row(result: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """One report object: the entry's result, its deltas against the baseline, its folder."""
    row = {k: v for k, v in result.items() if k not in ("fingerprint", "traceback", "forgetting_settings")}
    for k in metric_keys():
        ok = baseline is not None and result["status"] == "ok" and result.get(k) is not None and baseline.get(k) is not None
        row[f"{k}_delta"] = result[k] - baseline[k] if ok else None
    row["run_dir"] = f"runs/{result['name']}"
    return row


def settings(cfg: ExperimentConfig, entries: list[Entry]) -> dict[str, Any]:
    """The comparison's settings as one flat mapping: the shared training settings, then its own."""
    own = dataclasses.asdict(cfg)
    training = {k: v for k, v in own.pop("training").items() if k not in cfg.PER_ENTRY}
    return {**training, **own, "entries": [e.name for e in entries]}


def examples(cfg: ExperimentConfig, methods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first ``example_rows`` evaluation rows with every finished entry's prediction."""
    if cfg.example_rows == 0:
        return []
    rows = load_examples(cfg.eval_data, cfg.training.format, limit=cfg.example_rows)[0]
    out = [{"row": e.row, "input": e.source, "references": e.references, "predictions": {}} for e in rows]
    for m in methods:
        path = Path(cfg.output) / m["run_dir"] / "eval" / "predictions.jsonl"
        if m["status"] != "ok" or not path.is_file():
            continue
        predictions = {p["row"]: p["prediction"] for p in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
        for example in out:
            example["predictions"][m["name"]] = predictions.get(example["row"])
    return out


# --- the conclusion: sentences chosen and filled from the numbers ------------------------------------------
def conclusion(methods: list[dict[str, Any]]) -> str:
    ok = [m for m in methods if m["status"] == "ok"]
    failed = [m["name"] for m in methods if m["status"] != "ok"]
    baseline = next((m for m in ok if m["method"] == BASELINE), None)
    trained = [m for m in ok if m["method"] != BASELINE]
    name = ROUGE_NAMES[HEADLINE]
    parts: list[str] = []
    if not trained:
        parts.append("No trained entry finished." if baseline is None else
                     f"Only the zero-shot baseline finished ({name} {_points(baseline[HEADLINE])}).")
    else:
        best = max(trained, key=lambda m: m[HEADLINE])
        versus = f" ({_signed(best[HEADLINE] - baseline[HEADLINE])} over the zero-shot baseline's {_points(baseline[HEADLINE])})" if baseline else ""
        parts.append(f"Best {name}: {best['name']} with {_points(best[HEADLINE])}{versus}.")
        whole = [m for m in trained if m["saves_full_model"]]
        efficient = [m for m in trained if not m["saves_full_model"]]
        if whole and efficient:
            full = max(whole, key=lambda m: m[HEADLINE])
            peft = max(efficient, key=lambda m: m[HEADLINE])
            parts.append(_efficient_vs_full(peft, full, baseline))
        if baseline is not None:
            behind = [m["name"] for m in trained if m[HEADLINE] <= baseline[HEADLINE]]
            if behind:
                parts.append(f"{_join(behind)} did not beat the baseline on {name}.")
        measured = [m for m in trained if m.get("forgetting") is not None]
        if measured:
            parts.append(_forgetting_sentence(measured))
        merged = [m for m in ok if m.get("latency_merged_ms_per_token") and m.get("latency_ms_per_token")]
        if merged:
            m = max(merged, key=lambda m: m[HEADLINE])
            overhead = m["latency_ms_per_token"] / m["latency_merged_ms_per_token"] - 1
            parts.append(f"Unmerged, {m['name']} generates {_percent(overhead)} {'slower' if overhead >= 0 else 'faster'} per token "
                         f"than merged ({m['latency_ms_per_token']:.1f} vs {m['latency_merged_ms_per_token']:.1f} ms).")
    if failed:
        parts.append(f"{_join(failed)} failed (see report.json).")
    return " ".join(parts)


def _forgetting_sentence(measured: list[dict[str, Any]]) -> str:
    """Which entries forgot the least and the most (change of the general-text loss; > 0 is forgetting)."""
    ranked = sorted(measured, key=lambda m: m["forgetting"])
    each = ", ".join(f"{m['name']} {m['forgetting']:+.4f}" for m in ranked)
    text = f"Forgetting (change of the mean per-token loss on held-out general text, > 0 is worse): {each}"
    topic = [m for m in ranked if m.get("topic_accuracy_delta") is not None]
    if topic:
        text += ("; zero-shot topic accuracy on news articles (not trained) changed by "
                 + ", ".join(f"{m['name']} {100 * m['topic_accuracy_delta']:+.1f}" for m in topic) + " points")
    return text + "."


def _efficient_vs_full(peft: dict[str, Any], full: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    name = ROUGE_NAMES[HEADLINE]
    text = f"{peft['name']} trains {_percent_of(peft['trainable_percent'])} of the parameters and "
    if baseline is not None and full[HEADLINE] - baseline[HEADLINE] > 0 and peft[HEADLINE] < full[HEADLINE]:
        share = (peft[HEADLINE] - baseline[HEADLINE]) / (full[HEADLINE] - baseline[HEADLINE])
        text += f"recovers {100 * share:.0f}% of {full['name']}'s {name} gain ({_points(peft[HEADLINE])} vs {_points(full[HEADLINE])})"
    elif peft[HEADLINE] >= full[HEADLINE]:
        text += f"matches or beats {full['name']} on {name} ({_points(peft[HEADLINE])} vs {_points(full[HEADLINE])})"
    else:
        text += f"scores {_points(peft[HEADLINE])} against {full['name']}'s {_points(full[HEADLINE])} on {name}"
    costs = []
    if peft["stored_bytes"] and full["stored_bytes"]:
        costs.append(f"stores {_size(peft['stored_bytes'])} per task instead of {_size(full['stored_bytes'])}")
    ratios = [f"{peft[key] / full[key]:.2f}x the {what}" for key, what in
              (("peak_train_memory_mb", "peak training memory"), ("train_time_s", "training time")) if peft.get(key) and full.get(key)]
    if ratios:
        costs.append(f"needs {' and '.join(ratios)} of {full['name']}")
    return text + ("; it " + ", and ".join(costs) if costs else "") + "."


# --- report.md --------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any], plots: list[str]) -> str:
    s = report["settings"]
    steps = f"{s['max_steps']} steps" if s["max_steps"] else f"{s['epochs']:g} epoch(s)"
    trained = next((m for m in report["methods"] if m["status"] == "ok" and m["train_steps"]), None)
    seen = f" ({trained['train_examples_seen']} examples seen)" if trained else ""
    rows = f"the first {s['eval_limit']} rows" if s["eval_limit"] else "all rows"
    decoding = "greedy" if s["num_beams"] == 1 else f"beam search ({s['num_beams']} beams)"
    limited = f" (first {s['limit']} rows)" if s["limit"] else ""
    lines = [
        f"# peftkit {report['kind']}: {s['model']}",
        "",
        f"Training: `{s['train_data']}`{limited}, "
        f"{steps} of {s['batch_size'] * s['grad_accum']} examples{seen}, seed {s['seed']}, {s['schedule']} schedule, "
        f"warmup {s['warmup']:g}, precision {s['precision']}.",
        f"Evaluation: {rows} of `{s['eval_data']}`, {decoding}, at most {s['max_new_tokens']} new tokens; "
        f"latency on {s['latency_rows']} rows generated one at a time. The entries took {_duration(report['entries_wall_time_s'])} "
        f"in all (training, evaluation and timing, each in its last run; this run: {_duration(report['wall_time_s'])}); "
        f"peftkit {report['peftkit_version']}, {report['created']}.",
        _forgetting_setup(s["forgetting"]),
        "",
        table(report["methods"]),
        "",
        f"**Conclusion.** {report['conclusion']}",
        "",
        *scores_table(report["methods"], s["scoring"]),
    ]
    if report.get("rank_choice"):
        lines += [f"**{rank_choice_sentence(report['rank_choice'])}**", ""]
    for m in report["methods"]:
        if m["status"] != "ok":
            lines += [f"- **{m['name']} failed:** `{m['error']}`", ""]
    lines += [f"![{p}]({p})" for p in plots] + [""]
    if report["examples"]:
        lines += ["## Example predictions", ""]
        for ex in report["examples"]:
            source = ex["input"] if len(ex["input"]) <= 600 else ex["input"][:600] + " ..."
            lines += [f"### Row {ex['row']}", "", "```text", source, "```", ""]
            lines += [f"- **reference{'' if len(ex['references']) == 1 else f' {i}'}:** {r}" for i, r in enumerate(ex["references"], 1)]
            lines += [f"- **{name}:** {_cell(p) if p is not None else '(missing)'}" for name, p in ex["predictions"].items()]
            lines.append("")
    lines += ["Field definitions: `peftkit.experiments.report.REPORT_FIELDS` (and the README)."]
    return "\n".join(lines) + "\n"


def _forgetting_setup(f: dict[str, Any]) -> str:
    if not (f["general_texts"] or f["topic_rows"]):
        return "Forgetting: not measured."
    return (f"Forgetting: mean per-token loss on {f['general_texts']} held-out BBC News articles (first {f['general_tokens']} "
            f"tokens each) and zero-shot topic accuracy on {f['topic_rows']} other articles (first {f['topic_tokens']} tokens, "
            "label by likelihood), each entry against the base model before training.")


_MODE_WORDS = {"max": "each example's best reference", "mean": "each reference scored as its own row, averaged",
               "first": "the first reference only"}


def scores_table(methods: list[dict[str, Any]], scoring: dict[str, Any]) -> list[str]:
    """Every chosen metric under each reference mode (max / mean / first), headline mode first."""
    mode = scoring["reference_mode"]
    keys = metric_keys(scoring["metrics"])
    ok = [m for m in methods if m["status"] == "ok"]
    if not ok:
        return []
    modes = [mode, *(m for m in REFERENCE_MODES if m != mode)]
    head = ["method", *(f"{ROUGE_NAMES.get(k, k)} ({' / '.join(modes)})" if f"{k}_max" in score_fields() else k for k in keys)]
    lines = [f"**Scores** ({', '.join(scoring['metrics'])}). Headline reference mode: {mode} ({_MODE_WORDS[mode]}); "
             "the table above uses it. With several references per example the modes differ; compare with a published "
             "number only under the protocol it used. Text metrics x 100.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(head))) + "|"]
    for m in ok:
        cells = [m["name"]]
        for k in keys:
            if f"{k}_max" in score_fields():
                cells.append(" / ".join("-" if m.get(f"{k}_{x}") is None else _points(m[f"{k}_{x}"]) for x in modes))
            else:
                cells.append("-" if m.get(k) is None else f"{m[k]:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def table(methods: list[dict[str, Any]]) -> str:
    head = ["method", "lr", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "ΔROUGE-L vs baseline", "trainable params",
            "trainable %", "forgetting (Δ general loss)", "Δ topic accuracy", "peak train memory", "train time", "train tokens/s", "stored per task",
            "latency / example (merged)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(head))) + "|"]
    for m in methods:
        if m["status"] != "ok":
            lines.append("| " + " | ".join([m["name"], "failed"] + [""] * (len(head) - 2)) + " |")
            continue
        latency = "-" if m["latency_s_per_example"] is None else f"{m['latency_s_per_example']:.2f} s"
        if m["latency_merged_s_per_example"] is not None:
            latency += f" ({m['latency_merged_s_per_example']:.2f} s)"
        cells = [
            m["name"],
            "-" if m["lr"] is None else f"{m['lr']:g}",
            *(_points(m[k]) for k in ROUGE_TYPES),
            "-" if m["rougeL_delta"] is None or m["method"] == BASELINE else _signed(m["rougeL_delta"]),
            _count(m["trainable_params"]),
            f"{m['trainable_percent']:.3g}%",
            "-" if m.get("forgetting") is None else f"{m['forgetting']:+.4f}",
            "-" if m.get("topic_accuracy_delta") is None else f"{100 * m['topic_accuracy_delta']:+.1f} pts",
            "-" if m["peak_train_memory_mb"] is None else _size(m["peak_train_memory_mb"] * 2**20),
            "-" if m["train_time_s"] is None else _duration(m["train_time_s"]),
            "-" if m["train_tokens_per_s"] is None else f"{m['train_tokens_per_s']:.0f}",
            "-" if not m["stored_bytes"] else _size(m["stored_bytes"]),
            latency,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(output: Path, report: dict[str, Any], entries: list[Entry]) -> None:
    from .plots import write_plots  # matplotlib only when writing

    plots = write_plots(output, report)
    report["plots"] = plots
    atomic_write_text(output / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(output / "report.md", markdown(report, plots))


# --- formatting ---------------------------------------------------------------------------------------------
def _points(fraction: float) -> str:
    return f"{100 * fraction:.2f}"


def _signed(fraction: float) -> str:
    return f"{100 * fraction:+.2f}"


def _percent(x: float) -> str:
    return f"{100 * abs(x):.1f}%"


def _percent_of(percent: float) -> str:
    return f"{percent:.2g}%" if percent < 1 else f"{percent:.1f}%"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _size(n_bytes: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.{1 if n_bytes / size < 100 else 0}f} {unit}"
    return f"{n_bytes:.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m {secs:02d}s"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _cell(text: str) -> str:
    return " ".join(text.split()) or "(empty)"

