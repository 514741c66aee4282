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
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).resolve().parent / "results")  # gpu.sh: results/gpu
REPO = Path(__file__).resolve().parents[1]
# <repo>/../shared/data/dialogsum; from a git worktree one level deeper, one more level up.
DIALOGSUM_CANDIDATES = [REPO.parent / "shared" / "data" / "dialogsum", REPO.parent.parent / "shared" / "data" / "dialogsum"]


# BENCH_DATA=demo: peftkit's shipped demo dialogues stand in for DialogSum's splits (dev -> demo_train,
# test -> demo_eval), for a machine without ../shared (gpu.sh on a GPU machine). Timings keep their meaning;
# the texts differ, so losses and ROUGE are not DialogSum's.
DEMO_SPLITS = {"dev": "demo_train.jsonl", "test": "demo_eval.jsonl"}


def bench_data() -> str:
    """``dialogsum`` (default) or ``demo``, from ``BENCH_DATA``."""
    source = os.environ.get("BENCH_DATA", "dialogsum")
    if source not in ("dialogsum", "demo"):
        raise ValueError(f"BENCH_DATA must be 'dialogsum' (default) or 'demo', got {source!r}")
    return source


def data_name() -> str:
    """What the benchmarks read, for titles and results: ``DialogSum`` or ``peftkit demo``."""
    return {"dialogsum": "DialogSum", "demo": "peftkit demo"}[bench_data()]


def dialogsum(split: str = "dev") -> Path:
    """Path of a DialogSum split (``dev`` or ``test``), or a clear error saying where it was looked for."""
    if bench_data() == "demo":
        return REPO / "src" / "peftkit" / "data" / "demo" / DEMO_SPLITS[split]
    for folder in DIALOGSUM_CANDIDATES:
        if (folder / f"{split}.jsonl").is_file():
            return folder / f"{split}.jsonl"
    raise FileNotFoundError(f"DialogSum {split}.jsonl not found in {[str(p) for p in DIALOGSUM_CANDIDATES]}")


def load_average() -> float:
    """The machine's 1-minute load average (timings taken above ~1.2 on 2 cores are noisy)."""
    return round(os.getloadavg()[0], 2)


def set_threads(threads: int | None) -> None:
    """Torch intra-op threads for this benchmark and the processes it starts (None: torch's default, one per
    core). On a machine shared with other jobs, fewer threads than cores avoids OpenMP threads waiting for
    each other at every parallel region (10x slower steps were seen with 2 threads while another job ran)."""
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


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
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def check(name: str, value: float, target: str | None = None, detail: str = "") -> dict:
    """A result row. ``target`` like "<= 1.00" or ">= 2.0" gives it pass/fail; None: reported only.
    ``detail`` says what the two sides measured (e.g. "1.92 s vs 3.51 s")."""
    ok = None
    if target is not None:
        op, bound = target.split()
        ok = value <= float(bound) if op == "<=" else value >= float(bound)
    return {"metric": name, "value": round(value, 4), "target": target, "pass": ok, "detail": detail,
            "load": load_average()}


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n== {title} ==")
    for row in rows:
        mark = {True: "PASS", False: "FAIL", None: "-"}[row["pass"]]
        print(f"  {row['metric']:<62} {row['value']:>10.4f}   target {row['target'] or '-':<8} {mark:<4}  {row.get('detail', '')}")


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "load_average_at_end": load_average(), "data": data_name(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    print(f"  -> {path}")
    return path


def run_worker(args: list[str]) -> dict:
    """Run ``python <args>`` in a fresh process (own peak memory) and parse the JSON on its last stdout line."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    """Peak resident memory of this process. Linux's ``VmHWM`` (the high-water mark of this process image),
    not ``getrusage``'s ``ru_maxrss``, which a child started by a large parent inherits through fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_base(name: str = "smollm2-135m-instruct"):
    """``(load, tokenizer, path)`` for a catalogue name or model directory: ``load()`` returns a fresh fp32
    copy of the model in eval mode (on the CPU)."""
    import transformers
    from peftkit.hub import load_model, load_tokenizer, resolve_model

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    path = resolve_model(name)
    return (lambda: load_model(path)[0]), load_tokenizer(path), path


def left_padded_prompts(rows: int, prompt_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, mask, lengths)``: ``rows`` random prompts of ``prompt_tokens // 2`` to ``prompt_tokens`` tokens, padded
    on the left with token 2 (seed 0): the mixed batch of bench_inference.py and decode_floor.py."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(prompt_tokens // 2, prompt_tokens + 1, (rows,), generator=g)
    ids = torch.full((rows, prompt_tokens), 2)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths.tolist()):
        ids[row, -length:] = torch.randint(100, 49000, (length,), generator=g)
        mask[row, -length:] = 1
    return ids, mask, lengths


def dialogsum_training_batch(tokenizer, rows: int = 4, tokens: int = 256) -> dict[str, torch.Tensor]:
    """``rows`` x ``tokens`` of DialogSum dev as a training batch: the first rows whose prompt + summary
    (peftkit's default prompt format) has at least ``tokens`` tokens, each cut to its last ``tokens``
    tokens, so the summary (the loss targets) stays whole and no row is padded."""
    from peftkit.data import PromptFormat, collate_for_training, encode_examples, read_examples
    from peftkit.data.prompts import Encoded

    examples = read_examples(str(dialogsum("dev")), "dialogue", "summary", limit=200)
    encoded = encode_examples(examples, tokenizer, PromptFormat(max_source_tokens=4096), seq2seq=False).items
    long_enough = [e for e in encoded if len(e.input_ids) >= tokens][:rows]
    if len(long_enough) < rows:
        raise ValueError(f"only {len(long_enough)} of the first 200 DialogSum rows have {tokens} tokens")
    cut = [Encoded(e.input_ids[-tokens:], e.labels[-tokens:], 0) for e in long_enough]
    return collate_for_training(cut, tokenizer.pad_token_id)


@torch.no_grad()
def copy_lora_to_peft(ours, theirs, adapter_names: list[str]) -> int:
    """Copy peftkit's LoRA A/B weights of ``adapter_names`` into a ``peft`` model with the same adapters,
    so both compute the same function. Returns how many tensors were copied."""
    mine = dict(ours.named_parameters())
    copied = 0
    for key, p in theirs.named_parameters():
        for tensor in ("lora_A", "lora_B"):
            for name in adapter_names:
                if f".{tensor}.{name}." in key:  # ...q_proj.lora_A.<name>.weight
                    layer = key.split(f".{tensor}.")[0]  # base_model.model.<the model's own path>, in both
                    p.copy_(mine[f"{layer}.adapters.{name}.{tensor}.weight"])
                    copied += 1
    return copied
