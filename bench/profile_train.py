"""Where the training loop's time goes: ``peftkit train`` and ``Trainer`` + ``peft``, profiled the same way.

Not a comparison with a target: a diagnosis to run where an end-to-end ratio and a step ratio disagree (on an H100
``peftkit train`` trained at 0.27x the tokens/s of ``Trainer`` + ``peft`` while its step alone ran at 0.92x the
time). Each pipeline runs in a process of its own, exactly as ``bench/bench_finetune.py`` runs it (the same rows,
LoRA, optimisation and each side's settings), with ``torch.profiler`` over a window of optimizer steps: a global
optimizer-step hook advances the profiler's schedule, so both are cut at the same step boundaries, after
``--skip`` steps of start-up. Per profiled step it prints:

* wall time, and on a GPU the kernels' time and the share of the wall they fill (low: the device waits for the host);
* host reads of tensor values (``aten::_local_scalar_dense``: ``.item()``, ``bool(tensor)``, ``int(tensor)``), also
  those outside ``optimizer.step()`` (whose reads of AdamW's per-parameter step counts are CPU tensors), and
  ``aten::nonzero`` (boolean-mask indexing): on a GPU each of these on a device tensor makes the host wait for the
  device; counted on any device;
* on a GPU, CUDA synchronisations and memory copies;
* the ops with the most host (self CPU) time and, on a GPU, the kernels with the most device time,

and writes each pipeline's Chrome trace (chrome://tracing, https://ui.perfetto.dev) to ``--trace-dir``.

    .venv/bin/python bench/profile_train.py [--examples 64] [--skip 4] [--active 8] [--pipelines peftkit,trainer]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from common import dialogsum, run_worker, save, set_threads

PIPELINES = ("peftkit", "trainer")
HOST_READS = "aten::_local_scalar_dense"
SYNCS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")
COPIES = ("cudaMemcpy", "cudaMemcpyAsync")


def run_pipeline(kind: str, output: str, examples: int, model: str) -> None:
    """The pipeline as bench_finetune runs it (the profiler is already listening)."""
    import bench_finetune as bf

    if kind == "trainer":
        bf.peer_worker("trainer", output, examples, 42, model)
        return
    from peftkit.cli import main as peftkit_main

    if peftkit_main(bf.train_args(output, examples, 42, model)) != 0:
        raise RuntimeError("peftkit train failed (see above)")


def worker(kind: str, examples: int, model: str, skip: int, active: int, trace_dir: str | None, stacks: bool) -> None:
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=skip, warmup=1, active=active, repeat=1), with_stack=stacks)
    window: dict[str, float] = {}
    steps, pending = 0, False

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def after_step(optimizer, args, kwargs) -> None:  # every optimizer step of either pipeline
        nonlocal steps, pending
        steps, pending = steps + 1, True

    def before_forward(module, args) -> None:  # every module call: the first after an optimizer step starts a step
        nonlocal pending
        if not pending:
            return
        pending = False
        if steps == skip + 1:  # the window opens: the profiled steps start here
            sync()
            window["start"] = time.perf_counter()
        if steps == skip + 1 + active:  # the window closes: the profiled steps ended with the last optimizer step
            sync()
            window["end"] = time.perf_counter()
        prof.step()  # between steps, outside optimizer.step(): no op of a profiled step is cut in two

    handles = [register_optimizer_step_post_hook(after_step), register_module_forward_pre_hook(before_forward)]
    with tempfile.TemporaryDirectory() as tmp, prof:
        run_pipeline(kind, str(Path(tmp) / "run"), examples, model)
    for handle in handles:
        handle.remove()
    if "end" not in window:
        raise SystemExit(f"{kind}: the run took {steps} optimizer steps; --skip {skip} + --active {active} + 2 are needed")
    if trace_dir:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(trace_dir) / f"{kind}.json.gz"))  # gzip: Perfetto and chrome://tracing read it

    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep") and ".py(" not in e.key]  # ops, not --stacks' Python calls
    count = lambda *names: sum(e.count for e in events if e.key in names)  # noqa: E731
    spans = optimizer_steps(prof.events())
    waits = [e for e in prof.events() if e.name in (HOST_READS, "aten::nonzero") and not inside(e, spans)]
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
    wall = (window["end"] - window["start"]) / active
    top_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    top_device = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:8] if cuda else []
    print(json.dumps({
        "pipeline": kind, "device": "cuda" if cuda else "cpu", "steps": steps, "profiled_steps": active,
        "wall_ms_per_step": 1e3 * wall,
        "device_ms_per_step": device_us / 1e3 / active if cuda else None,
        "host_reads_per_step": count(HOST_READS) / active,
        "host_reads_outside_optimizer_per_step": sum(e.name == HOST_READS for e in waits) / active,
        "nonzero_per_step": count("aten::nonzero") / active,
        "cuda_syncs_per_step": count(*SYNCS) / active if cuda else None,
        "cuda_copies_per_step": count(*COPIES) / active if cuda else None,
        "top_host_ms_per_step": [(e.key, round(e.self_cpu_time_total / 1e3 / active, 2), round(e.count / active, 1)) for e in top_host],
        "top_device_ms_per_step": [(e.key[:80], round(e.self_device_time_total / 1e3 / active, 2)) for e in top_device],
        "wait_sources_per_step": sorted(((source, n / active) for source, n in Counter(
            f"{e.name.split('::')[-1]} at {caller(e)}" for e in waits).items()), key=lambda x: -x[1]) if stacks else None,
    }))


def optimizer_steps(events) -> list[tuple[float, float]]:
    """The time spans of ``optimizer.step()`` calls. AdamW reads each parameter's step count there, a CPU
    tensor unless ``capturable``: no wait on a GPU."""
    return [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith("Optimizer.step")]


def inside(event, spans: list[tuple[float, float]]) -> bool:
    return any(start <= event.time_range.start <= end for start, end in spans)


def caller(event) -> str:
    """The innermost Python function outside torch itself that led to ``event`` (``--stacks``, which records
    Python calls as events of their own, named ``path.py(line): function``)."""
    parent = event.cpu_parent
    while parent is not None:
        if ".py(" in parent.name and not parent.name.startswith("torch/") and "/torch/" not in parent.name:
            return parent.name
        parent = parent.cpu_parent
    return "?"


def report(result: dict) -> None:
    kind, wall = result["pipeline"], result["wall_ms_per_step"]
    print(f"\n== {kind} ({result['device']}; steps {result['profiled_steps']} of {result['steps']} profiled) ==")
    line = f"  wall {wall:.1f} ms/step"
    if result["device_ms_per_step"] is not None:
        busy = result["device_ms_per_step"] / wall
        line += f"; kernels {result['device_ms_per_step']:.1f} ms/step ({100 * busy:.0f}% of the wall)"
    print(line)
    print(f"  host reads of tensor values {result['host_reads_per_step']:.1f}/step "
          f"({result['host_reads_outside_optimizer_per_step']:.1f} outside optimizer.step()), nonzero {result['nonzero_per_step']:.1f}/step"
          + (f", CUDA syncs {result['cuda_syncs_per_step']:.1f}/step, copies {result['cuda_copies_per_step']:.1f}/step"
             if result["cuda_syncs_per_step"] is not None else ""))
    print("  most host time (self CPU ms/step, calls/step):")
    for name, ms, calls in result["top_host_ms_per_step"]:
        print(f"    {ms:9.2f}  {calls:7.1f}  {name}")
    if result.get("wait_sources_per_step"):
        print("  where the host reads and nonzero calls outside optimizer.step() come from (per step):")
        for source, n in result["wait_sources_per_step"]:
            print(f"    {n:5.1f}  {source}")
    if result["top_device_ms_per_step"]:
        print("  most device time (ms/step):")
        for name, ms in result["top_device_ms_per_step"]:
            print(f"    {ms:9.2f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64, help="training rows (batches of 4): enough steps for --skip + 1 + --active")
    parser.add_argument("--skip", type=int, default=4, help="start-up steps before the profiled window (one more warms the profiler)")
    parser.add_argument("--active", type=int, default=8, help="steps profiled")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated, of {', '.join(PIPELINES)}")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name or model directory")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--trace-dir", default=None, help="write each pipeline's Chrome trace here")
    parser.add_argument("--stacks", action="store_true", help="also say where each host read and nonzero call comes from "
                        "(records Python stacks: slower, so the times mean less)")
    parser.add_argument("--worker", choices=PIPELINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.worker:
        return worker(args.worker, args.examples, args.model, args.skip, args.active, args.trace_dir, args.stacks)
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown:
        parser.error(f"--pipelines: unknown {', '.join(unknown)}; choose from {', '.join(PIPELINES)}")
    if args.skip + args.active + 2 > -(-args.examples // 4):
        parser.error(f"--examples {args.examples} gives {-(-args.examples // 4)} steps of 4; --skip + --active + 2 needs "
                     f"{args.skip + args.active + 2}")
    print(f"profile_train: {args.examples} rows of {dialogsum('dev')}, model {args.model}; steps {args.skip + 2} to "
          f"{args.skip + args.active + 1} profiled (from the first forward after optimizer step {args.skip + 1} to the first "
          f"after step {args.skip + args.active + 1})")
    extra = ["--threads", str(args.threads)] if args.threads else []
    extra += ["--trace-dir", args.trace_dir] if args.trace_dir else []
    extra += ["--stacks"] if args.stacks else []
    results = []
    for kind in pipelines:
        results.append(run_worker([__file__, "--worker", kind, "--examples", str(args.examples), "--model", args.model,
                                   "--skip", str(args.skip), "--active", str(args.active), *extra]))
        report(results[-1])
    save("profile_train", {"pipelines": results, "settings": vars(args)})  # no "rows": not a table of ratios


if __name__ == "__main__":
    sys.exit(main())
