"""Serving many adapters: continuous mixed-adapter batching vs swapping adapters, vs ``peft``.

All modes run behind the same HTTP server (``peftkit.serve.app``) in this process, with the same clients:

* ``static``: the serving engine (``peftkit serve``) with its KV cache in preallocated slots
  (``--kv-cache static``). Concurrent requests for different adapters share one forward pass per
  decoding step; new requests join between steps.
* ``dynamic``: the same engine with transformers' ``DynamicCache`` (``--kv-cache dynamic``).
* ``swap``: the alternative without batching. One request at a time: ``set_adapter(name)`` then
  ``generate`` (Hugging Face's loop with a KV cache), the next request waits.
* ``peft``: the reference package at its best for mixed adapters: every waiting request (up to
  ``--max-batch-size``) in one left-padded batch, ``generate(adapter_names=[...])``; requests arriving
  meanwhile wait for the next batch (``generate`` cannot take rows mid-way).

C closed-loop clients (C = 1, 8, 32) send N greedy requests in total, spread round-robin over 1 or 8
adapters; the modes run in turn for each setting (``--repeats`` rounds, median requests/s). Printed:
requests/s, p50/p99 latency, the ratios with each side's settings and the load average, and whether
the generated texts equal the static engine's request by request. Before that, the decoding step alone
(``--step-rows`` requests, one adapter each, in one engine without HTTP; static and dynamic cache in
turn): median ms per step. Results go to ``bench/results/serve.json`` (one entry per model).

    .venv/bin/python bench/bench_serve.py                      # a small random Llama, built here
    .venv/bin/python bench/bench_serve.py --model DIR --requests 32 --max-tokens 32   # a real model dir
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import transformers
from common import load_average

from peftkit import LoraConfig, get_peft_model
from peftkit.serve import batch
from peftkit.serve.app import create_app, load_base
from peftkit.serve.engine import Engine, Output, Request, SamplingParams
from peftkit.tuner import BASE

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "serve.json"
WORDS = ("the a cat dog sat on mat and ran to park hello world how are you today summarize this text please answer "
         "yes no good bad red blue green one two three four five six seven eight nine ten bird fish tree house car "
         "road river sun moon star rain snow wind fire water stone book pen paper door window chair table").split()


class SwapEngine(Engine):
    """The baseline: one request at a time, ``set_adapter`` (or the bare base) then ``generate``."""

    def _step(self) -> None:
        with self._cond:
            if not self._waiting:
                return
            r = self._waiting.popleft()
        self._admitted = [r]
        model = self.model
        ids = torch.tensor([r.prompt_ids], device=self.device)
        if r.adapter == BASE:
            context = model.disable_adapter()
        else:
            model.set_adapter(r.adapter)
            context = contextlib.nullcontext()
        with context:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.params.max_tokens,
                                 do_sample=False, eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id)
        r.generated = out[0, ids.shape[1]:].tolist()
        ended = bool(r.generated) and r.generated[-1] in self.eos_ids
        piece, _ = r.text.update(r.generated[:-1] if ended else r.generated, final=True)
        r.finished = True
        self.counters["tokens"] += len(r.generated)
        self.counters["finished"] += 1
        r.emit(Output(piece, "stop" if ended else "length", len(r.prompt_ids), len(r.generated)))


class PeftEngine(Engine):
    """The reference: ``peft.PeftModel`` with every adapter loaded; each step takes every waiting request (up
    to ``max_batch_size``) and runs one ``generate(adapter_names=[...])`` over them, left-padded."""

    peft_model = None

    def _load(self, name: str, path: str, future) -> None:
        import peft

        base = self.model.get_base_model()  # peftkit's wrapper holds no adapter; peft injects into the base
        if self.peft_model is None:
            self.peft_model = peft.PeftModel.from_pretrained(base, path, adapter_name=name).eval()
        else:
            self.peft_model.load_adapter(path, adapter_name=name)
        with self._cond:
            self._loading.discard(name)
            self._adapters[name] = str(path)
        future.set_result(name)

    def _step(self) -> None:
        with self._cond:
            take = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.max_batch_size))]
        if not take:
            return
        self._admitted = take
        ids, mask = batch.left_padded([r.prompt_ids for r in take], self.pad_id, self.device)
        out = self.peft_model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max(r.params.max_tokens for r in take), do_sample=False,
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id, adapter_names=[r.adapter for r in take])
        self.counters["steps"] += 1
        self.counters["max_rows"] = max(self.counters["max_rows"], len(take))
        for r, row in zip(take, out[:, ids.shape[1]:].tolist(), strict=True):
            generated = row[: r.params.max_tokens]
            ended = next((i for i, t in enumerate(generated) if t in self.eos_ids), None)
            r.generated = generated if ended is None else generated[: ended + 1]
            piece, _ = r.text.update(r.generated[:-1] if ended is not None else r.generated, final=True)
            r.finished = True
            self.counters["tokens"] += len(r.generated)
            self.counters["finished"] += 1
            r.emit(Output(piece, "stop" if ended is not None else "length", len(r.prompt_ids), len(r.generated)))


MODES = {
    "static": (Engine, {"kv_cache": "static"}),
    "dynamic": (Engine, {"kv_cache": "dynamic"}),
    "swap": (SwapEngine, {}),
    "peft": (PeftEngine, {}),
    # the static engine over a base whose linear layers compute with oneDNN-prepacked weights
    # (bench/decode_floor.py's fastest eager decoder); adapters stay separate
    "packed": (Engine, {"kv_cache": "static", "prepack_weights": True}),
}
DEFAULT_MODES = ["static", "dynamic", "swap", "peft"]


def settings(mode: str, args) -> str:
    """What each side ran, printed next to every ratio."""
    dtype = "fp32" if args.dtype == "auto" and (args.device or "cpu") == "cpu" else args.dtype
    common = f"{dtype}, greedy, {torch.get_num_threads()} torch thread(s)"
    if mode in ("static", "dynamic"):
        return f"peftkit serve [continuous batching, max {args.max_batch_size} rows, {mode} KV cache, {common}]"
    if mode == "packed":
        return f"peftkit serve [continuous batching, max {args.max_batch_size} rows, static KV cache, oneDNN-prepacked base weights, {common}]"
    if mode == "swap":
        return f"swap [peftkit set_adapter + transformers generate, one request at a time, {common}]"
    import peft

    return (f"peft {peft.__version__} [generate(adapter_names=...) over every waiting request, up to {args.max_batch_size} "
            f"rows, left-padded, dynamic cache, {common}]")


# --- models and adapters --------------------------------------------------------------------------------
def tiny_model_dir(root: Path) -> Path:
    """A random Llama (4 layers, hidden 256) with a word-level tokenizer; small enough for seconds per run."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from serve_utils import make_tokenizer  # the tests' offline tokenizer: nothing is downloaded

    tokenizer = make_tokenizer()
    tokenizer.model_max_length = 512
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    path = root / "tiny-llama-256"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_adapters(model_dir: Path, root: Path, count: int) -> dict[str, Path]:
    """``count`` random LoRA adapters (r=8 on q/v, non-zero B so each one changes the outputs)."""
    adapters = {}
    for i in range(count):
        torch.manual_seed(1000 + i)
        base, _ = load_base(str(model_dir), "cpu", "float32")
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.5)
        adapters[f"task{i}"] = root / "adapters" / f"task{i}"
        model.save_pretrained(adapters[f"task{i}"])
    return adapters


# --- one run ------------------------------------------------------------------------------------------
class Server:
    def __init__(self, app):
        import uvicorn

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server failed to start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()


async def drive(url: str, jobs: list[dict], concurrency: int) -> tuple[float, list[float], list[str]]:
    """C closed-loop clients over ``jobs``; returns wall seconds, per-request latencies, texts."""
    latencies, texts = [0.0] * len(jobs), [""] * len(jobs)
    next_job = iter(range(len(jobs)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            for i in next_job:
                start = time.perf_counter()
                r = await client.post("/v1/completions", json=jobs[i])
                r.raise_for_status()
                latencies[i] = time.perf_counter() - start
                texts[i] = r.json()["choices"][0]["text"]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, texts


def run(mode: str, model_dir: Path, adapters: dict[str, Path], jobs: list[dict], concurrency: int, max_batch_size: int,
        device: str | None, dtype: str):
    engine_class, options = MODES[mode]
    model, tokenizer = load_base(str(model_dir), device, dtype)
    engine = engine_class(model, tokenizer, max_batch_size=max_batch_size, max_queue=4096, **options)
    for name, path in adapters.items():
        engine.load_adapter(name, str(path)).result()
    app = create_app(engine, tokenizer, model_name="base")
    with Server(app) as server:
        asyncio.run(drive(server.url, jobs[: min(len(jobs), 2)], 1))  # warm-up (not timed)
        clock = time.pthread_getcpuclockid(engine._thread.ident)
        cpu_start = time.clock_gettime(clock)
        seconds, latencies, texts = asyncio.run(drive(server.url, jobs, concurrency))
        cpu = time.clock_gettime(clock) - cpu_start
    tokens = engine.stats()["tokens"]
    return seconds, latencies, texts, engine.stats(), tokens, cpu


def decode_steps(model_dir: Path, adapters: dict[str, Path], prompts: list[str], max_tokens: int, repeats: int,
                 device: str | None, dtype: str, kinds: list[str]) -> dict[str, list[float]]:
    """Seconds of each decoding step of ``len(prompts)`` requests (one adapter each, admitted together) in an
    engine driven by hand, for each of ``kinds`` (static, dynamic, packed) in turn, ``repeats`` rounds."""
    engines = {}
    for kind in kinds:
        model, tokenizer = load_base(str(model_dir), device, dtype)
        engines[kind] = Engine(model, tokenizer, max_batch_size=len(prompts), **MODES[kind][1])
        for name, path in adapters.items():
            engines[kind].load_adapter(name, str(path)).result()
    names = list(adapters)
    ids = [tokenizer(p).input_ids for p in prompts]
    times: dict[str, list[float]] = {k: [] for kind in engines for k in (kind, f"{kind}_cpu")}
    tokens: dict[str, list] = {}
    for round_ in range(repeats + 1):  # round 0 warms up
        for kind, engine in engines.items():
            requests = [Request(p, names[i % len(names)], SamplingParams(max_tokens=max_tokens, temperature=0), lambda out: None)
                        for i, p in enumerate(ids)]
            engine.submit(requests)
            with torch.inference_mode():
                engine._step()  # prefill + the first step
                while engine._rows:
                    start, cpu_start = time.perf_counter(), time.thread_time()
                    engine._step()
                    if round_:
                        times[kind].append(time.perf_counter() - start)
                        times[f"{kind}_cpu"].append(time.thread_time() - cpu_start)
            tokens[kind] = [r.generated for r in requests]
    times["same_tokens"] = {kind: tokens[kind] == tokens["dynamic"] for kind in kinds}
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local Hugging Face model directory (default: build a small random Llama)")
    parser.add_argument("--requests", type=int, default=64, help="requests per run (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES),
                        help="the first is the one the others are compared with (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every mode per setting (median requests/s)")
    parser.add_argument("--step-rows", type=int, default=8, help="rows of the decoding-step timing (0: skip it)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = Path(args.model) if args.model else tiny_model_dir(root)
        all_adapters = make_adapters(model_dir, root, max(args.adapters + [args.step_rows]))
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        rng = random.Random(0)
        prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(args.requests)]
        step = {}
        if args.step_rows:
            step_adapters = dict(list(all_adapters.items())[: args.step_rows])
            load = load_average()
            kinds = ["static", "dynamic"] + (["packed"] if "packed" in args.modes else [])
            times = decode_steps(model_dir, step_adapters, prompts[: args.step_rows], args.max_tokens, args.repeats,
                                 args.device, args.dtype, kinds)
            step = {k: round(1000 * statistics.median(times[k]), 2) for kind in kinds for k in (kind, f"{kind}_cpu")}
            step.update(rows=args.step_rows, steps_timed=len(times["static"]), same_tokens=times["same_tokens"],
                        load_average=[load, load_average()])
            print(json.dumps({"decode_step_ms": step}), flush=True)
        runs, rows = [], []
        for n_adapters in args.adapters:
            adapters = dict(list(all_adapters.items())[:n_adapters])
            names = list(adapters)
            jobs = [{"model": names[i % n_adapters], "prompt": p, "max_tokens": args.max_tokens, "temperature": 0}
                    for i, p in enumerate(prompts)]
            for concurrency in args.concurrency:
                texts, entries = {}, {mode: [] for mode in args.modes}
                for _ in range(args.repeats):
                    for mode in args.modes:  # in turn, so that drift in the machine's speed hits every mode alike
                        load = load_average()
                        seconds, latencies, texts[mode], stats, tokens, cpu = run(
                            mode, model_dir, adapters, jobs, concurrency, args.max_batch_size, args.device, args.dtype)
                        entry = {
                            "mode": mode, "adapters": n_adapters, "concurrency": concurrency, "requests": len(jobs),
                            "seconds": round(seconds, 3), "requests_per_s": round(len(jobs) / seconds, 3),
                            # the engine thread's CPU time: what the machine would take alone, whatever else runs
                            "engine_cpu_s": round(cpu, 3), "requests_per_engine_cpu_s": round(len(jobs) / cpu, 3),
                            "tokens_per_s": round(tokens / seconds, 1),
                            "p50_latency_s": round(percentile(latencies, 50), 4), "p99_latency_s": round(percentile(latencies, 99), 4),
                            "max_rows_in_a_step": stats["max_rows"], "load_average": load,
                        }
                        runs.append(entry)
                        entries[mode].append(entry)
                        print(json.dumps(entry), flush=True)
                first = args.modes[0]
                same = {mode: sum(a == b for a, b in zip(texts[first], texts[mode])) for mode in args.modes}
                median_of = {mode: statistics.median(e["requests_per_s"] for e in entries[mode]) for mode in args.modes}
                median_cpu = {mode: statistics.median(e["requests_per_engine_cpu_s"] for e in entries[mode]) for mode in args.modes}
                loads = [e["load_average"] for mode in args.modes for e in entries[mode]]
                rows.append((n_adapters, concurrency, median_of, median_cpu, entries, same, len(jobs), (min(loads), max(loads))))

    first = args.modes[0]
    print(f"\nmodel: {args.model or 'tiny random Llama (4 layers, hidden 256)'}; {args.requests} requests x "
          f"{args.max_tokens} tokens, greedy; torch threads {torch.get_num_threads()}; {args.repeats} round(s) per mode")
    for mode in args.modes:
        print(f"  {mode}: {settings(mode, args)}")
    if step:
        print(f"decoding step, {step['rows']} rows with one adapter each, median of {step['steps_timed']} steps "
              f"(wall ms / CPU ms of the thread; load {step['load_average']}); tokens equal to dynamic's: {step['same_tokens']}")
        for kind in [k for k in ("static", "packed") if k in step]:
            print(f"  {kind} {step[kind]:.1f} / {step[kind + '_cpu']:.1f} ms vs dynamic {step['dynamic']:.1f} / "
                  f"{step['dynamic_cpu']:.1f} ms -> dynamic / {kind}: {step['dynamic'] / step[kind]:.2f}x wall, "
                  f"{step['dynamic_cpu'] / step[kind + '_cpu']:.2f}x CPU")
    print("requests/s (wall) and requests per CPU second of the engine thread (what the work costs, whatever else runs)")
    header = " | ".join(f"{mode + ' req/s':>13} {'/cpu s':>7} {'p50 s':>7}" for mode in args.modes)
    print(f"{'adapters':>8} {'clients':>7} | {header} | load")
    ratios = []
    for n_adapters, concurrency, median_of, median_cpu, entries, same, total, loads in rows:
        cells = " | ".join(f"{median_of[m]:>13.3f} {median_cpu[m]:>7.3f} {statistics.median(e['p50_latency_s'] for e in entries[m]):>7.2f}"
                           for m in args.modes)
        print(f"{n_adapters:>8} {concurrency:>7} | {cells} | {loads[0]:.2f}-{loads[1]:.2f}")
        for mode in args.modes[1:]:
            ratio, cpu_ratio = median_of[first] / median_of[mode], median_cpu[first] / median_cpu[mode]
            ratios.append({"adapters": n_adapters, "concurrency": concurrency, f"requests_per_s_{first}_over_{mode}": round(ratio, 2),
                           f"requests_per_engine_cpu_s_{first}_over_{mode}": round(cpu_ratio, 2),
                           "same_text": f"{same[mode]}/{total}", "load_average": list(loads),
                           first: settings(first, args), mode: settings(mode, args)})
            print(f"{'':>17}{first} / {mode}: {ratio:.2f}x requests/s, {cpu_ratio:.2f}x per engine CPU second; texts equal "
                  f"to {first}'s: {same[mode]}/{total}; load {loads[0]:.2f}-{loads[1]:.2f}; {first} = {settings(first, args)}; "
                  f"{mode} = {settings(mode, args)}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.is_file() else {}
    key = Path(args.model).name if args.model else "tiny-random-llama-256"
    existing[key] = {
        "model": args.model or "random Llama: 4 layers, hidden 256, vocab %d" % len(tokenizer),
        "device": torch.cuda.get_device_name() if (args.device or "").startswith("cuda") or (args.device is None and torch.cuda.is_available())
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(), "requests": args.requests, "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size, "repeats": args.repeats, "decode_step_ms": step,
        "settings": {mode: settings(mode, args) for mode in args.modes}, "runs": runs, "ratios": ratios,
    }
    out.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
