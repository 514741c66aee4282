"""The training loop, written out once and read top to bottom:
set up, model, data, optimizer, resume, then per step: batches, forward, loss, backward, step,
schedule, log, evaluate, checkpoint; finally save the adapter (or full model) and ``run.json``.

It runs on a CPU, a GPU, or several processes with DDP (``torchrun --nproc_per_node 2 -m peftkit.cli
train ...``, or ``accelerate launch --multi_gpu``): Hugging Face Accelerate finds out which, wraps the
model, and the loop splits each global batch between the processes. With ``sharding="fsdp"`` the
processes split the model itself instead of copying it (:mod:`peftkit.train.sharding`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .. import __version__
from ..data import (
    BatchStream,
    EncodedSet,
    collate_for_training,
    encode_examples,
    load_encoded,
    load_examples,
    sorted_batches,
)
from ..hub import is_seq2seq, load_model
from ..io.files import append_line, atomic_write_text
from ..model import get_peft_model
from ..options import setting_changes
from ..quantize import prepare_model_for_kbit_training
from ..precision import autocast, norm_outputs_in_autocast_dtype, resolve_precision, store_frozen_linear_weights_in_bf16
from .checkpoint import latest_checkpoint, load_checkpoint, read_state, remove_stale_checkpoints, save_checkpoint, save_final
from .compile import auto_compile, compile_blocks, eager
from .config import RESUMABLE_CHANGES, TrainConfig
from .loss import loss_fn
from .sharding import gather_for_saving, parameter_bytes, resolve_sharding, shard_model, whole
from .tracking import CURVE, RUN_NAME, resolve_report_to, tracker_config, write_loss_curve


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN/inf; nothing after the last good checkpoint was kept."""


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warmup, then decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg`` and return what ``run.json`` records. Raises :class:`TrainingDiverged` on NaN/inf."""
    if cfg.task == "classify":
        from ..classify import train_classifier

        return train_classifier(cfg)
    cfg.check_required()
    reset_peak_memory()  # the peak reported in run.json is this run's, not the process's so far
    started = time.perf_counter()
    output = Path(cfg.output)

    # --- processes, device, precision, seed ------------------------------------------------------
    # Several processes without a GPU (torchrun, accelerate launch --multi_gpu): DDP over gloo on the CPU.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    tracker = resolve_report_to(cfg.report_to)  # a tracker that is not installed fails here, before any work
    accelerator = Accelerator(cpu=cfg.cpu or (launched and not torch.cuda.is_available()), log_with=tracker, project_dir=output)
    device, world, rank, main = accelerator.device, accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    use_bf16, precision_reason = resolve_precision(cfg.precision, device)
    set_seed(cfg.seed)
    say = print if main else (lambda *a, **k: None)

    # --- model: the frozen base plus one trainable adapter ----------------------------------------
    preset, peft_config = cfg.preset(), cfg.method_config()  # a wrong option fails here, before any loading
    train_examples, data_format, data_notes = load_examples(cfg.data, cfg.format, limit=cfg.limit)
    base, tokenizer = load_model(cfg.model, quantize=cfg.quantize, device=str(device))
    seq2seq = is_seq2seq(base.config)
    if cfg.quantize != "none":  # freeze, norms and embeddings in fp32, as peft's prepare_model_for_kbit_training
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(base, peft_config)
    if cfg.gradient_checkpointing is None:  # the default: on for a quantized base (the QLoRA recipe), run.json says which
        cfg = dataclasses.replace(cfg, gradient_checkpointing=cfg.quantize != "none")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    model.to(device).train()
    trainable, total = model.get_nb_trainable_parameters()
    sharding = resolve_sharding(cfg.sharding, world, cfg.method, hasattr(model.tuner(), "update_and_allocate"), cfg.quantize != "none")
    sharded = sharding == "fsdp"
    cfg = dataclasses.replace(cfg, sharding=sharding)  # run.json and --resume see a launcher's FSDP config too
    say(f"peftkit train: {cfg.method} on {cfg.model}{'' if cfg.quantize == 'none' else f' ({cfg.quantize}-quantized)'}: "
        f"{trainable:,d} of {total:,d} parameters train "
        f"({100 * trainable / total:.4f}%); lr {cfg.peak_lr:g}{'' if cfg.lr is not None else ' (the method default)'}; "
        f"precision {'bf16 autocast' if use_bf16 else 'fp32'} ({precision_reason})")

    # --- data: tokenized once; a batch is a list of example indices ------------------------------
    train_set, eval_set = encode_data(cfg, train_examples, data_format, data_notes, tokenizer, seq2seq, say)
    items, pad_id = train_set.items, tokenizer.pad_token_id
    lengths = [len(e.input_ids) + len(e.labels) * seq2seq for e in items]
    # One stream batch = the examples of one optimizer step (batch_size x grad_accum x processes), so how a
    # step is split into micro-batches and processes does not change which examples it learns from.
    stream = BatchStream(lengths, cfg.batch_size * cfg.grad_accum * world, cfg.seed, cfg.group_by_length, min_rows=cfg.grad_accum * world)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * stream.batches_per_epoch))

    # --- sharding, optimizer, schedule, processes -----------------------------------------------------
    if sharded:  # before the optimizer: it must hold the sharded parameters
        shard_model(model, device, world)
        say(f"peftkit train: the model is sharded between {world} processes (FSDP2)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
    schedule = partial(lr_factor, schedule=cfg.schedule, warmup_steps=math.ceil(cfg.warmup * total_steps), total_steps=total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ddp_model = model if sharded else accelerator.prepare_model(model)  # the model itself on one process, DDP-wrapped on several
    if use_bf16 and not sharded:  # after DDP's start-up broadcast: the frozen weights are not synchronised again
        store_frozen_linear_weights_in_bf16(model)  # same bf16 matmuls as autocast's casts, half the memory
        norm_outputs_in_autocast_dtype(model)  # each norm's output cast to bf16 once, not once per linear layer
    if cfg.compile is None:  # the default: compile where that pays; run.json records which
        planned_tokens = round(sum(lengths) * total_steps / stream.batches_per_epoch)
        chosen, why = auto_compile(model, device, use_bf16 and not sharded and cfg.quantize == "none", world, seq2seq, planned_tokens)
        cfg = dataclasses.replace(cfg, compile=chosen)
        say(f"peftkit train: {'compiling' if chosen else 'not compiling'} by default: {why} ({'--no-compile' if chosen else '--compile'} to change)")
    if cfg.compile:  # after the weights took their final dtype: the compiled code is specialised to it
        compiled, found = compile_blocks(model)
        say(f"peftkit train: {compiled} of {found} transformer blocks compile at the first step (torch.compile, regional; "
            "the first block of each stack stays eager)")
    # A method that steers its own training (AdaLoRA: an orthogonality penalty in the loss, and the rank
    # moved between layers from the gradients after each optimizer step) provides these two hooks.
    steering = model.tuner() if hasattr(model.tuner(), "update_and_allocate") else None

    # --- resume, logging -----------------------------------------------------------------------------
    done_steps, elapsed_before = resume(cfg, output, model, optimizer, scheduler, accelerator, total_steps, say, sharded)
    if tracker is not None:
        accelerator.init_trackers(RUN_NAME, config=tracker_config(dataclasses.asdict(cfg)))
    log = _TrainLog(output / "train_log.jsonl", enabled=main, keep_up_to=done_steps, tracker=accelerator if tracker else None)
    elapsed = lambda: elapsed_before + time.perf_counter() - started  # noqa: E731  (wall time, over resumes)
    held_out_loss = partial(evaluate_loss, model, eval_set, cfg.batch_size, pad_id, cfg.target_only_logits, device, use_bf16,
                            accelerator, lockstep=sharded)

    def evaluate() -> float:  # compiled blocks run eager here: an inference graph would be a second compile
        with eager() if cfg.compile else nullcontext():
            return held_out_loss()

    # --- the loop --------------------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=done_steps, disable=not main, desc="train", unit="step", dynamic_ncols=True)
    meter = _Meter()  # loss, targets and tokens since the last log line
    loop_started, eval_seconds = time.perf_counter(), 0.0
    last_loss = eval_loss = initial_eval_loss = None
    if eval_set is not None and done_steps == 0:  # the starting point, to compare the trained model against
        initial_eval_loss = evaluate()
        log.write({"step": 0, "eval_loss": initial_eval_loss, "elapsed_s": elapsed()})
        eval_seconds = time.perf_counter() - loop_started
        meter.restart()
    for step in range(done_steps + 1, total_steps + 1):  # step: the number of this optimizer step, from 1
        # batch: this step's examples, cut into grad_accum micro-batches; this process takes every world-th
        # row of each. Every process knows the whole plan, so counts need no communication.
        rows = stream.batch(step - 1)
        micro_batches = [rows[i :: cfg.grad_accum] for i in range(cfg.grad_accum)]
        targets = sum(items[i].num_targets for i in rows)

        # forward, loss, backward: the token losses are summed and divided by the step's target count over
        # all micro-batches and processes, so the update equals one large batch's
        step_loss = torch.zeros((), device=device)
        for i, micro_rows in enumerate(micro_batches):
            batch = collate_for_training([items[j] for j in micro_rows[rank::world]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            last = i == len(micro_batches) - 1  # DDP averages gradients only on the last micro-batch
            with nullcontext() if last or sharded else accelerator.no_sync(ddp_model):
                with autocast(device, use_bf16):
                    token_loss, _ = loss_fn(ddp_model, batch, cfg.target_only_logits)
                loss = token_loss * world / targets  # DDP divides by the number of processes
                accelerator.backward(loss)
            step_loss += loss.detach() / world
        if steering is not None:
            accelerator.backward(steering.orthogonal_regularization())
        step_loss = accelerator.reduce(step_loss, reduction="sum")

        # clip, check, step, schedule
        grad_norm = whole(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))  # sharded: summed over processes
        if not (torch.isfinite(step_loss) and torch.isfinite(grad_norm)):
            bar.close()
            raise TrainingDiverged(_diverged_message(step, step_loss, grad_norm, scheduler, output))
        step_lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        if steering is not None:  # reads the gradients: before they are cleared
            steering.update_and_allocate(step, total_steps)
        optimizer.zero_grad(set_to_none=True)
        last_loss = step_loss.item()
        meter.add(last_loss, targets, tokens=sum(lengths[i] for i in rows))
        bar.update(1)

        # log
        record: dict[str, Any] = {}
        if step % cfg.log_every == 0 or step == total_steps:
            loss_since, tokens_per_s = meter.read()
            record = {"step": step, "epoch": round(step / stream.batches_per_epoch, 4), "loss": loss_since, "lr": step_lr,
                      "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_s, "elapsed_s": elapsed()}
            bar.set_postfix(loss=f"{loss_since:.4f}", lr=f"{step_lr:.2e}", tok_s=f"{tokens_per_s:.0f}")

        # evaluate
        if eval_set is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
            eval_started = time.perf_counter()
            eval_loss = evaluate()
            eval_seconds += time.perf_counter() - eval_started
            meter.pause(time.perf_counter() - eval_started)  # tokens/s counts training time only
            record = {**record, "step": step, "eval_loss": eval_loss, "elapsed_s": elapsed()}
            bar.set_postfix(loss=f"{last_loss:.4f}", eval_loss=f"{eval_loss:.4f}")
        log.write(record)

        # checkpoint
        if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps):
            epoch, batch_index = divmod(step, stream.batches_per_epoch)
            state = {"step": step, "data_position": {"epoch": epoch, "batch": batch_index}, "world_size": world,
                     "elapsed_s": elapsed(), "config": dataclasses.asdict(cfg)}
            save_checkpoint(output, step, model, optimizer, scheduler, state, accelerator, cfg.keep_checkpoints, sharded)
    bar.close()
    train_seconds = time.perf_counter() - loop_started - eval_seconds

    # --- save: the adapter in the Hugging Face PEFT format, or the complete model --------------------
    run: dict[str, Any] = {}
    gathered = gather_for_saving(model, preset.saves_full_model) if sharded else None  # every process takes part
    if main:
        run = {
            "peftkit_version": __version__,
            "config": dataclasses.asdict(cfg),
            "method": cfg.method,
            "lr": cfg.peak_lr,
            "saves_full_model": preset.saves_full_model,
            "seq2seq": seq2seq,
            "format": {**dataclasses.asdict(data_format), "chat_template_used": train_set.chat_template_used},
            "device": str(device),
            "processes": world,
            "precision": "bf16" if use_bf16 else "fp32",
            "precision_reason": precision_reason,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100 * trainable / total,
            "parameter_mb_per_process": parameter_bytes(model) / 2**20,  # sharded: ~1/processes of the model
            "steps": max(done_steps, total_steps),
            "total_steps": total_steps,
            "examples": len(items),
            "truncated_inputs": train_set.truncated_inputs,
            "truncated_targets": train_set.truncated_targets,
            "final_loss": last_loss,
            "eval_loss_before": initial_eval_loss,
            "eval_loss": eval_loss,
            "train_tokens_per_s": meter.tokens_total / train_seconds if train_seconds > 0 and meter.tokens_total else None,
            "train_time_s": train_seconds,
            "eval_time_s": eval_seconds,
            "wall_time_s": elapsed(),
            **peak_memory(device),
        }
        curve = lambda folder: write_loss_curve(output / "train_log.jsonl", folder / CURVE)  # noqa: E731
        save_final(output, model, tokenizer, run, preset.saves_full_model, extra=curve, tensors=gathered)  # staged; run.json moved in last
        say(f"peftkit train: saved {'the model' if preset.saves_full_model else 'the adapter'} to {output}")
    for t in accelerator.trackers:  # flush and close the tracker's files
        t.finish()
    accelerator.wait_for_everyone()
    return run


def encode_data(cfg: TrainConfig, examples, data_format, notes: list[str], tokenizer, seq2seq: bool, say) -> tuple[EncodedSet, EncodedSet | None]:
    """The training rows and the held-out rows (``cfg.eval_data``, if any) as token ids, with what was
    noticed on the way (layout recognised, rows cut) said once."""
    train_set = encode_examples(examples, tokenizer, data_format, seq2seq)
    for note in notes:
        say(f"peftkit train: {note}")
    eval_set = load_encoded(cfg.eval_data, tokenizer, data_format, seq2seq, limit=cfg.eval_limit)[1] if cfg.eval_data else None
    for name, encoded in (("training", train_set), ("evaluation", eval_set)):
        if encoded is not None and encoded.describe():
            say(f"peftkit train: {name} data: {encoded.describe()}")
    return train_set, eval_set


def resume(cfg: TrainConfig, output: Path, model, optimizer, scheduler, accelerator: Accelerator, total_steps: int, say,
           sharded: bool = False) -> tuple[int, float]:
    """Restore the latest checkpoint in ``output`` when ``cfg.resume``: ``(steps done, seconds spent)``,
    ``(0, 0.0)`` for a fresh start. Clears what a killed run left half-written first. ``sharded``: each
    process reads its own pieces."""
    if accelerator.is_main_process:
        remove_stale_checkpoints(output)  # temporary files, unfinished saves
    accelerator.wait_for_everyone()
    checkpoint = latest_checkpoint(output)
    if checkpoint is not None and not cfg.resume:
        raise ValueError(f"{output} holds checkpoints of an earlier run; add --resume to continue it, or choose another --output.")
    if checkpoint is None:
        if cfg.resume:
            say(f"peftkit train: no checkpoint in {output}; starting from the beginning")
        return 0, 0.0
    _check_same_run(read_state(checkpoint), cfg, accelerator.num_processes, checkpoint)
    state = load_checkpoint(checkpoint, model, optimizer, scheduler, accelerator.process_index, sharded)
    say(f"peftkit train: resuming from {checkpoint} (step {state['step']} of {total_steps})")
    return state["step"], state["elapsed_s"]


class _Meter:
    """The training loss per target token and the tokens per second since the last log line; tokens/s
    counts training time only (evaluation is paused out)."""

    def __init__(self) -> None:
        self.tokens_total = 0
        self.restart()

    def restart(self) -> None:
        self.loss, self.targets, self.tokens, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, targets: int, tokens: int) -> None:
        self.loss += loss * targets
        self.targets += targets
        self.tokens += tokens
        self.tokens_total += tokens

    def pause(self, seconds: float) -> None:
        self.start += seconds

    def read(self) -> tuple[float, float]:
        """``(mean loss, tokens/s)`` since the last read; starts the next interval."""
        out = (self.loss / self.targets, self.tokens / (time.perf_counter() - self.start))
        self.restart()
        return out


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass. Non-reentrant checkpointing is the
    variant that passes gradients to adapters even though the frozen inputs do not require grad."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


@torch.no_grad()
def evaluate_loss(model, data: EncodedSet, batch_size: int, pad_id: int, target_only: bool, device, use_bf16: bool, accelerator=None,
                  lockstep: bool = False) -> float:
    """Mean token cross-entropy on held-out data; the processes split the batches and add up
    (``accelerator=None``: one process, as in ``peftkit eval``). ``target_only``: as in :func:`loss_fn`.
    ``lockstep``: every process runs as many forward passes (a sharded model gathers each layer from all of
    them), the extra ones counted for nothing."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), torch.zeros((), device=device, dtype=torch.float64)
    lengths = [len(e.input_ids) + len(e.labels) for e in data.items]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    batches = sorted_batches(lengths, batch_size)
    mine = batches[rank::world]
    for turn in range(math.ceil(len(batches) / world) if lockstep else len(mine)):
        rows = mine[turn] if turn < len(mine) else batches[0]
        batch = {k: v.to(device) for k, v in collate_for_training([data.items[i] for i in rows], pad_id).items()}
        with autocast(device, use_bf16):
            loss, n = loss_fn(model, batch, target_only)
        if turn < len(mine):
            total += loss.double()
            count += n
    model.train(was_training)
    if accelerator is not None:
        total, count = accelerator.reduce(total, reduction="sum"), accelerator.reduce(count, reduction="sum")
    return (total / count).item()


def reset_peak_memory() -> None:
    """Start the peak-memory counters afresh: Linux's resident-set high-water mark (``VmHWM``) and, on
    GPUs, PyTorch's allocator peak. ``getrusage``'s maximum cannot be reset and is even inherited from
    the parent process across fork and exec, so it would report an earlier peak as this run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "reset the peak resident set size to the current one" (Linux >= 4.0)
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """Peak resident memory (MB) since :func:`reset_peak_memory`, and peak GPU memory when on a GPU.
    Where ``/proc`` is missing (macOS, Windows) it falls back to the process's lifetime peak."""
    import resource

    peak_kb = None
    try:
        with open("/proc/self/status") as f:
            peak_kb = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        pass
    if peak_kb is None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux; bytes on macOS
        peak_kb = peak_kb / 1024 if sys.platform == "darwin" else peak_kb
    out: dict[str, float | None] = {"peak_rss_mb": peak_kb / 1024}
    out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return out


def _check_same_run(state: dict[str, Any], cfg: TrainConfig, world: int, checkpoint: Path) -> None:
    changed = setting_changes(state["config"], dataclasses.asdict(cfg), ignore=RESUMABLE_CHANGES)
    if changed:
        raise ValueError(f"--resume: {checkpoint} was written with different settings ({'; '.join(changed)}); "
                         "resume with the original settings or start a new --output.")
    if state["world_size"] != world:
        raise ValueError(f"--resume: {checkpoint} was written by {state['world_size']} process(es), this run has {world}; "
                         "resume with the same number of processes.")


def _diverged_message(step: int, loss: torch.Tensor, grad_norm: torch.Tensor, scheduler, output: Path) -> str:
    what = f"loss {loss.item()}" if not torch.isfinite(loss) else f"gradient norm {grad_norm.item()}"
    last = latest_checkpoint(output)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved (use --save-every)"
    return (f"training diverged at step {step}: {what} (lr {scheduler.get_last_lr()[0]:.3g}); the step was not applied and "
            f"{kept}. Lower --lr (or raise --warmup), then run again{' with --resume' if last else ''}.")


class _TrainLog:
    """``train_log.jsonl``: one JSON object per logged step. On resume, lines after the checkpoint's
    step are dropped (they will be logged again), so the file reads like one uninterrupted run."""

    def __init__(self, path: Path, enabled: bool, keep_up_to: int, tracker: Accelerator | None = None) -> None:
        self.path, self.enabled, self.tracker = path, enabled, tracker
        if not enabled:
            return
        kept = []
        if path.is_file() and keep_up_to > 0:
            kept = [line for line, record in _read_log(path) if record["step"] <= keep_up_to]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled and record:
            append_line(self.path, json.dumps(record))
            if self.tracker is not None:  # the same numbers, under the same step
                self.tracker.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def _read_log(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The lines of ``train_log.jsonl`` with their records. A kill (or a full disk) can cut the last line
    short: that line is dropped, with a note; a damaged line before it is an error naming the line."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
        except ValueError as e:
            if number == len(lines):
                print(f"peftkit train: {path}: dropped its last line, cut off when the run was interrupted "
                      f"({len(line)} characters: {line[:40]!r}...)", file=sys.stderr)
                break
            raise ValueError(f"--resume: {path}, line {number} is not a log record ({e}); delete that line "
                             "(the steps it logged will be missing from the log) and resume again.") from None
        out.append((line, record))
    return out
