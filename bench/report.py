"""The README's performance table, generated from ``bench/results/*.json`` (so it shows measured numbers).

    .venv/bin/python bench/report.py                 # print the table
    .venv/bin/python bench/report.py --write-readme  # replace the table in README.md (between the markers)

Results from a GPU run (``bench/gpu.sh`` writes ``bench/results/gpu/``) get a table of their own, headed by
the card's name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
START, END = "<!-- bench:start (bench/report.py writes this table) -->", "<!-- bench:end -->"
ORDER = ["train_step", "finetune", "inference", "eval", "memory"]
TITLES = {"train_step": "training step", "finetune": "end-to-end fine-tune", "inference": "inference",
          "eval": "evaluation generation", "memory": "memory"}


def load_results(folder: Path) -> list[dict]:
    found = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    found = {k: v for k, v in found.items() if isinstance(v.get("rows"), list)}  # serve.json has its own layout
    return [found[k] for k in sorted(found, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER))]


def fmt(value: float, metric: str) -> str:
    if "overhead" in metric or metric.startswith("held-out loss"):
        return f"{value:+.3f}" if "loss" in metric else f"{100 * value:+.1f}%"
    if "latency (ms)" in metric:
        return f"{value * 1000:.1f} us"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def fmt_target(target: str | None, metric: str) -> str:
    if target is None:
        return "-"
    op, bound = target.split()
    if "overhead" in metric:
        return f"{op} {100 * float(bound):.0f}%"
    return target


def table(results: list[dict]) -> str:
    lines = ["| benchmark | metric | value | target | result | measured | load |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        name = TITLES.get(result["benchmark"], result["benchmark"])
        for row in result["rows"]:
            mark = {True: "PASS", False: "**FAIL**", None: "-"}[row["pass"]]
            detail = row.get("detail", "").replace("|", "/")
            lines.append(f"| {name} | {row['metric']} | {fmt(row['value'], row['metric'])} | {fmt_target(row['target'], row['metric'])} "
                         f"| {mark} | {detail} | {row.get('load', '-')} |")
            name = ""
    return "\n".join(lines)


def describe(results: list[dict]) -> str:
    machines = {json.dumps(r["machine"], sort_keys=True) for r in results}
    parts = []
    for m in map(json.loads, sorted(machines)):
        device = f"GPU {m['cuda']}" if m.get("cuda") else f"CPU {m['cpu']} ({m['cores']} cores)"
        parts.append(f"{device}, torch {m['torch']}, {m['torch_threads']} torch thread(s)")
    dates = sorted(r["date"] for r in results)
    return f"Measured on {'; '.join(parts)}, {dates[0]} to {dates[-1]}."


def stale(results: list[dict]) -> str:
    """A warning under a table whose end-to-end rows predate the peers' best settings (they would flatter peftkit)."""
    if any(r["benchmark"] == "finetune" and "peer_settings" not in r for r in results):
        return ("\n\nThe end-to-end fine-tune rows of this table come from a run in which `Trainer` + `peft` ran in fp32 "
                "with random sampling, not at the settings its users would choose (bf16, length grouping): a handicapped "
                "peer, so those ratios overstate peftkit's lead. Rerun the benchmark to replace them.")
    return ""


def render() -> str:
    blocks = []
    cpu = load_results(HERE / "results")
    if cpu:
        blocks.append(describe(cpu) + "\n\n" + table(cpu) + stale(cpu))
    gpu_dir = HERE / "results" / "gpu"
    gpu = load_results(gpu_dir) if gpu_dir.is_dir() else []
    if gpu:
        card = gpu[0]["machine"].get("cuda") or "GPU"
        models = sorted({r.get("settings", {}).get("model", "?") for r in gpu})
        data = sorted({r.get("data", "DialogSum") for r in gpu})
        blocks.append(f"On a GPU ({card}; `bench/gpu.sh`, fp32 and bf16; model {', '.join(models)}; data {', '.join(data)}):\n\n"
                      + describe(gpu) + "\n\n" + table(gpu) + stale(gpu))
    return "\n\n".join(blocks) if blocks else "(no results yet: run `make bench`)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-readme", action="store_true", help=f"replace the table in {README.name}")
    args = parser.parse_args()
    text = render()
    if not args.write_readme:
        print(text)
        return 0
    readme = README.read_text(encoding="utf-8")
    if START not in readme or END not in readme:
        print(f"report.py: {README} has no {START} ... {END} markers", file=sys.stderr)
        return 1
    before, rest = readme.split(START, 1)
    _, after = rest.split(END, 1)
    README.write_text(f"{before}{START}\n{text}\n{END}{after}", encoding="utf-8")
    print(f"report.py: wrote the table into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
