"""Evaluation: generate a prediction per row and score it (ROUGE by default; see metrics.py).

    metrics = evaluate(EvalConfig(adapter="runs/lora", data="test.jsonl", output="runs/lora/eval", limit=100))

writes ``OUTPUT/metrics.json`` (each metric as a fraction in [0, 1] under the chosen reference mode,
and as ``KEY_max``, ``KEY_mean``, ``KEY_first`` under all three; ``n``, the settings and timings) and
``OUTPUT/predictions.jsonl`` (one line per row: prediction, references, its per-row scores).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..data import PromptFormat, load_encoded
from ..hub import DEFAULT_MODEL, is_seq2seq, load_model
from ..io.files import CONFIG_NAME, atomic_write_text, staged_directory
from ..model import PeftModel
from ..precision import autocast, cast_linear_weights_to_bf16, resolve_precision
from .format import FormatOverrides, eval_format, overrides_from
from .generate import GenerationSettings, generate_predictions
from .metrics import METRICS, REFERENCE_MODES, ScoringSettings, check_available, metric_keys, score_fields, score_text
from .rouge import ROUGE_TYPES, rouge, rouge_per_example, sentences_on_lines


@dataclass
class EvalConfig:
    """An evaluation run.

    Args:
        model: Base model (directory, hub id or catalogue name). ``None``: the base model the adapter
            records in its adapter_config.json, else the catalogue default.
        adapter: Adapter directory (Hugging Face PEFT format) to apply; ``None`` evaluates the model itself.
        data: Rows to evaluate: a .jsonl, .json or .csv file, or a hub dataset ``org/name[:split]`` (with
            ``pip install peftkit[datasets]``, online); references from the target field(s).
        output: Directory for metrics.json and predictions.jsonl.
        limit: Evaluate only the first N rows.
        format: Layout, fields, prompt template, chat template and truncation; each unset one is the training
            run's (read from run.json beside the adapter), so the prompts are the ones the adapter learned from.
        override_training_format: Evaluate with format settings that differ from the training run's
            (without it, such a setting is an error: the adapter never saw that prompt).
        generation: Decoding settings.
        scoring: Metrics and how several references per example are scored.
        cpu: Stay on the CPU even when a GPU is present.
        check_values: Refuse adapter weights holding NaN/inf or integers (a diverged run, or not an
            adapter); turn off only to inspect such a file.
        task: ``generate`` scores generated text with ROUGE; ``classify`` scores the labels that an adapter from
            ``peftkit train --task classify`` predicts with accuracy and macro-F1 (:mod:`peftkit.classify`).
        quantize: Load the base model quantized (``nf4``, ``fp4``, ``int8``, see ``peftkit train --quantize``) or not
            (``none``). ``auto``: as the adapter was trained (its run.json), else not quantized.
    """

    model: str | None = None
    adapter: str | None = None
    data: str = ""
    output: str = ""
    limit: int | None = None
    format: FormatOverrides = field(default_factory=FormatOverrides)
    override_training_format: bool = False
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    cpu: bool = False
    check_values: bool = True
    task: Literal["generate", "classify"] = "generate"
    quantize: Literal["auto", "none", "nf4", "fp4", "int8"] = "auto"

    def __post_init__(self) -> None:
        if self.task not in ("generate", "classify"):
            raise ValueError(f"task must be 'generate' or 'classify', got {self.task!r}.")
        if self.quantize not in ("auto", "none", "nf4", "fp4", "int8"):
            raise ValueError(f"quantize must be auto, none, nf4, fp4 or int8, got {self.quantize!r}.")
        if isinstance(self.format, PromptFormat):  # a whole format built in Python: what it changes from the defaults
            self.format = overrides_from(self.format)
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be an integer >= 1, got {self.limit!r}.")


def load_for_inference(model: str | None, adapter: str | None, device: torch.device, check_values: bool = True,
                       quantize: str = "auto"):
    """``(model, tokenizer, model_name)``: the base model with ``adapter`` attached (frozen), on ``device``.
    ``check_values=False`` accepts adapter weights holding NaN/inf or integers. ``quantize``: ``auto`` loads the
    base as the adapter was trained (quantized when its run.json says so), else ``none``/``nf4``/``fp4``/``int8``."""
    if adapter is not None:
        path = Path(adapter)
        if not (path / CONFIG_NAME).is_file():
            if (path / "config.json").is_file():
                raise ValueError(f"{adapter} holds a complete model, not an adapter: pass it as --model {adapter}.")
            raise FileNotFoundError(f"{adapter} is not an adapter directory (no {CONFIG_NAME}).")
        if model is None:
            recorded = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
            model = recorded or DEFAULT_MODEL
    model = model or DEFAULT_MODEL
    if quantize == "auto":
        quantize = trained_quantization(adapter)
    base, tokenizer = load_model(model, quantize=quantize, device=str(device))
    net = PeftModel.from_pretrained(base, adapter, check_values=check_values) if adapter is not None else base
    return net.to(device).eval(), tokenizer, model


def trained_quantization(adapter: str | None) -> str:
    """How the base model was quantized when ``adapter`` trained on it (``run.json`` beside it), else ``"none"``."""
    run = Path(adapter) / "run.json" if adapter is not None else None
    if run is None or not run.is_file():
        return "none"
    try:
        return json.loads(run.read_text(encoding="utf-8")).get("config", {}).get("quantize", "none") or "none"
    except (ValueError, AttributeError):
        return "none"


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Generate, score, write ``metrics.json`` and ``predictions.jsonl``; returns the metrics."""
    if cfg.task == "classify":
        from ..classify import evaluate_classifier

        return evaluate_classifier(cfg)
    if not cfg.data:
        raise ValueError("No evaluation data: give --data FILE.")
    if not cfg.output:
        raise ValueError("No output directory: give --output DIR.")
    check_available(cfg.scoring.metrics)
    started = time.perf_counter()
    # before the model loads, so a format that contradicts training fails at once
    fmt, format_source = eval_format(cfg.format, cfg.adapter, cfg.model, cfg.override_training_format)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    model, tokenizer, model_name = load_for_inference(cfg.model, cfg.adapter, device, cfg.check_values, cfg.quantize)
    use_bf16, precision_reason = resolve_precision(cfg.generation.precision, device)
    if use_bf16:
        cast_linear_weights_to_bf16(model)
    seq2seq = is_seq2seq(model.config)
    examples, encoded = load_encoded(cfg.data, tokenizer, fmt, seq2seq, limit=cfg.limit)
    if progress:
        for line in [f"prompt format from {format_source}", *encoded.notes, encoded.describe()]:
            if line:
                print(f"peftkit eval: {line}")

    generation_started = time.perf_counter()
    with autocast(device, use_bf16):
        predictions = generate_predictions(model, tokenizer, encoded.items, cfg.generation, seq2seq, progress=progress)
    generation_seconds = time.perf_counter() - generation_started
    references = [e.references for e in examples]
    scores, per_example = score_text(predictions, references, cfg.scoring)
    if {"loss", "perplexity"} & set(cfg.scoring.metrics):
        from ..train.loop import evaluate_loss

        # encoded holds prompt + first reference, the labels covering the reference (as in training)
        loss = evaluate_loss(model, encoded, cfg.generation.batch_size, tokenizer.pad_token_id, False, device, use_bf16)
        scores.update({k: v for k, v in (("loss", loss), ("perplexity", math.exp(loss))) if k in cfg.scoring.metrics})
    metrics: dict[str, Any] = {
        **scores,
        "n": len(predictions),
        "metrics": list(cfg.scoring.metrics),
        "reference_mode": cfg.scoring.reference_mode,
        "model": model_name,
        "adapter": cfg.adapter,
        "data": cfg.data,
        "references_per_example": max(len(r) for r in references),
        "truncated_inputs": encoded.truncated_inputs,
        "format": {**dataclasses.asdict(encoded.format), "chat_template_used": encoded.chat_template_used},
        "format_source": format_source,
        "generation": dataclasses.asdict(cfg.generation),
        "scoring": dataclasses.asdict(cfg.scoring),
        "precision": "bf16" if use_bf16 else "fp32",
        "precision_reason": precision_reason,
        "generation_s": generation_seconds,
        "examples_per_s": len(predictions) / generation_seconds if generation_seconds > 0 else None,
        "wall_time_s": time.perf_counter() - started,
    }
    output = Path(cfg.output)
    lines = [
        json.dumps({"row": e.row, "prediction": p, "references": e.references, **{k: round(v, 6) for k, v in s.items()}})
        for e, p, s in zip(examples, predictions, per_example, strict=True)
    ]
    # Staged and moved in together, metrics.json last: its presence means the evaluation is complete.
    with staged_directory(output, last=("metrics.json",)) as staging:
        atomic_write_text(staging / "predictions.jsonl", "".join(line + "\n" for line in lines))
        atomic_write_text(staging / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


__all__ = [
    "EvalConfig",
    "FormatOverrides",
    "GenerationSettings",
    "METRICS",
    "REFERENCE_MODES",
    "ROUGE_TYPES",
    "ScoringSettings",
    "check_available",
    "eval_format",
    "evaluate",
    "generate_predictions",
    "load_for_inference",
    "metric_keys",
    "score_fields",
    "rouge",
    "rouge_per_example",
    "score_text",
    "sentences_on_lines",
]
