"""Shared benchmark helpers: interleaved repetitions, medians, ratios against a target, JSON results.

Every benchmark measures peftkit and the reference *in the same run*, alternating between them so that
drift in the machine's speed (other processes, thermal state) hits both alike, and reports the median.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each candidate, run in turn ``repeats`` times (after ``warmup`` untimed rounds)."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def check(name: str, value: float, target: str) -> dict:
    """``target`` like "<= 1.00" or ">= 2.0"; returns a row with pass/fail."""
    op, bound = target.split()
    ok = value <= float(bound) if op == "<=" else value >= float(bound)
    return {"metric": name, "value": round(value, 4), "target": target, "pass": ok}


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n== {title} ==")
    for row in rows:
        mark = "PASS" if row["pass"] else "FAIL"
        print(f"  {row['metric']:<58} {row['value']:>10.4f}   target {row['target']:<8} {mark}")


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    print(f"  -> {path.relative_to(RESULTS.parent.parent)}")
    return path


def run_worker(args: list[str]) -> dict:
    """Run ``python <args>`` in a fresh process (own peak memory) and parse the JSON on its last stdout line."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
