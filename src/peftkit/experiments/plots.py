"""The report's plots (PNG, matplotlib's Agg backend: no display needed).

- ``quality_vs_params.png``: ROUGE-1/2/L against trainable parameters (log scale); the zero-shot
  baseline, which trains nothing, is a dashed line per metric.
- ``costs.png``: peak training memory, training time, stored size per task (log scale) and generation
  latency per new token, one example at a time (unmerged and merged), for each entry.
- ``gain_vs_forgetting.png``: the task gain (ROUGE-L over the zero-shot baseline, or ROUGE-L without one)
  against forgetting (change of the general-text loss) per entry, with the Pareto front: the entries no
  other entry beats on both (more gain and less forgetting).
- ``rank_sweep.png`` (sweeps): ROUGE against rank, and trainable parameters against rank on a second axis;
  a second panel shows forgetting against rank when it was measured.

Failed entries are left out of every plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import BASELINE

METRICS = (("rouge1", "ROUGE-1", "o"), ("rouge2", "ROUGE-2", "s"), ("rougeL", "ROUGE-L", "^"))
COLORS = ("tab:blue", "tab:orange", "tab:green")


def write_plots(output: Path, report: dict[str, Any]) -> list[str]:
    """Write the plots into ``output``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [m for m in report["methods"] if m["status"] == "ok"]
    if not ok:
        return []
    written = []
    for name, draw in (("quality_vs_params.png", _quality), ("costs.png", _costs), ("gain_vs_forgetting.png", _pareto),
                       ("rank_sweep.png", _rank_sweep)):
        if name == "rank_sweep.png" and report["kind"] != "sweep":
            continue
        figure = draw(plt, ok, report)
        if figure is None:
            continue
        figure.savefig(Path(output) / name, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(name)
    return written


def _quality(plt, ok: list[dict[str, Any]], report: dict[str, Any]):
    trained = [m for m in ok if m["trainable_params"] > 0]
    baseline = next((m for m in ok if m["method"] == BASELINE), None)
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for (key, label, marker), color in zip(METRICS, COLORS):
        if trained:
            ax.scatter([m["trainable_params"] for m in trained], [100 * m[key] for m in trained], marker=marker,
                       color=color, label=label, zorder=3)
        if baseline is not None:
            ax.axhline(100 * baseline[key], color=color, linestyle="--", linewidth=1,
                       label=f"{label}, zero-shot baseline")
    for m in trained:
        ax.annotate(m["name"], (m["trainable_params"], 100 * m["rougeL"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if trained:
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("ROUGE (F-measure x 100)")
    ax.set_title(f"Quality against trainable parameters: {report['settings']['model']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return figure


def _costs(plt, ok: list[dict[str, Any]], report: dict[str, Any]):
    names = [m["name"] for m in ok]
    panels = [
        ("peak training memory (MB)", [m["peak_train_memory_mb"] for m in ok], False),
        ("training time (s)", [m["train_time_s"] for m in ok], False),
        ("stored per task (MB, log scale)", [m["stored_bytes"] / 2**20 if m["stored_bytes"] else None for m in ok], True),
    ]
    figure, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    for ax, (title, values, log) in zip(axes, panels):
        _bars(ax, names, values)
        ax.set_title(title, fontsize=9)
        if log and any(values):
            ax.set_yscale("log")
    ax = axes[3]
    positions = list(range(len(ok)))
    unmerged = [m["latency_ms_per_token"] or 0 for m in ok]
    merged = [m["latency_merged_ms_per_token"] or 0 for m in ok]
    ax.bar([p - 0.2 for p in positions], unmerged, width=0.4, label="as trained (unmerged)", color="tab:blue")
    ax.bar([p + 0.2 for p in positions], merged, width=0.4, label="merged", color="tab:green")
    ax.set_xticks(positions, names, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"generation latency, one example at a time\n(ms per new token, {report['settings']['latency_rows']} rows)", fontsize=9)
    ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(forgetting, gain)`` that no other point beats on both (less forgetting and
    more gain, one of them strictly), sorted by forgetting."""
    front = [i for i, (f, g) in enumerate(points)
             if not any(f2 <= f and g2 >= g and (f2, g2) != (f, g) for f2, g2 in points)]
    return sorted(front, key=lambda i: points[i])


def _pareto(plt, ok: list[dict[str, Any]], report: dict[str, Any]):
    trained = [m for m in ok if m["method"] != BASELINE and m.get("forgetting") is not None]
    if not trained:
        return None
    relative = all(m.get("rougeL_delta") is not None for m in trained)
    points = [(m["forgetting"], 100 * (m["rougeL_delta"] if relative else m["rougeL"])) for m in trained]
    figure, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([f for f, _ in points], [g for _, g in points], color="tab:blue", zorder=3)
    for m, (f, g) in zip(trained, points):
        ax.annotate(m["name"], (f, g), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:green", linestyle="-",
            linewidth=1, label="Pareto front (more gain, less forgetting)")
    ax.axvline(0, color="gray", linestyle="--", linewidth=0.8)
    if relative:
        ax.axhline(0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("forgetting: change of mean per-token loss on held-out general text (> 0: worse)")
    ax.set_ylabel("ROUGE-L gain over the zero-shot baseline (points)" if relative else "ROUGE-L (x 100)")
    ax.set_title(f"Task gain against forgetting: {report['settings']['model']}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return figure


def _bars(ax, names: list[str], values: list[float | None]) -> None:
    positions = range(len(names))
    bars = ax.bar(list(positions), [v or 0 for v in values], color="tab:blue")
    ax.bar_label(bars, labels=[_short(v) if v else "n/a" for v in values], fontsize=7)
    ax.set_xticks(list(positions), names, rotation=30, ha="right", fontsize=8)


def _short(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def _rank_sweep(plt, ok: list[dict[str, Any]], report: dict[str, Any]):
    trained = [m for m in ok if m["method"] != BASELINE and "r" in m["method_options"]]
    if not trained:
        return None
    baseline = next((m for m in ok if m["method"] == BASELINE), None)
    groups: dict[str, list[dict[str, Any]]] = {}
    for m in trained:
        modules = m["method_options"].get("target_modules")
        label = "default modules" if modules is None else modules if isinstance(modules, str) else "+".join(modules)
        groups.setdefault(label, []).append(m)
    measured = [m for m in trained if m.get("forgetting") is not None]
    figure, axes = plt.subplots(1, 2 if measured else 1, figsize=(13 if measured else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    params_axis = ax.twinx()
    for i, (label, members) in enumerate(groups.items()):
        members.sort(key=lambda m: m["method_options"]["r"])
        ranks = [m["method_options"]["r"] for m in members]
        suffix = f" ({label})" if len(groups) > 1 else ""
        for (key, name, marker), color in zip(METRICS, COLORS):
            ax.plot(ranks, [100 * m[key] for m in members], marker=marker, color=color,
                    linestyle=("-", "-.", ":")[i % 3], label=f"{name}{suffix}")
        params_axis.plot(ranks, [m["trainable_params"] for m in members], color="gray", marker="x",
                         linestyle=("-", "-.", ":")[i % 3], label=f"trainable parameters{suffix}")
    if baseline is not None:
        for (key, name, _), color in zip(METRICS, COLORS):
            ax.axhline(100 * baseline[key], color=color, linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ranks = sorted({m["method_options"]["r"] for m in trained})
    ax.set_xticks(ranks, [str(r) for r in ranks])
    params_axis.set_yscale("log")
    ax.set_xlabel("rank r (log scale)")
    ax.set_ylabel("ROUGE (x 100); dashed: zero-shot baseline")
    params_axis.set_ylabel("trainable parameters (log scale)")
    ax.set_title(f"Rank sweep: {report['settings']['model']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    more_lines, more_labels = params_axis.get_legend_handles_labels()
    ax.legend(lines + more_lines, labels + more_labels, fontsize=7, loc="best")
    if measured:
        _forgetting_vs_rank(axes[0][1], groups, ranks)
        figure.tight_layout()
    return figure


def _forgetting_vs_rank(ax, groups: dict[str, list[dict[str, Any]]], ranks: list[int]) -> None:
    for i, (label, members) in enumerate(groups.items()):
        members = [m for m in members if m.get("forgetting") is not None]
        ax.plot([m["method_options"]["r"] for m in members], [m["forgetting"] for m in members], marker="o",
                color="tab:red", linestyle=("-", "-.", ":")[i % 3], label=label if len(groups) > 1 else "forgetting")
    ax.axhline(0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank r (log scale)")
    ax.set_ylabel("change of general-text loss (> 0: forgetting)")
    ax.set_title("Forgetting against rank", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
