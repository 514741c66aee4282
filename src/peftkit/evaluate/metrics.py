"""The metrics ``peftkit eval`` and ``peftkit compare`` can compute, one entry each in :data:`METRICS`.

Every score comes from a maintained library, called the way its authors intend; nothing here
re-implements a metric. Adding one is one entry: a :class:`Metric` naming the keys it writes and a
function ``score(predictions, references) -> {key: value}`` over a list of (prediction, reference)
rows, or, for a metric of the model rather than its text, ``model=True`` (computed by ``evaluate``).

Several references per example (DialogSum's test split has three). Published figures use different
protocols, and they differ by several points, so every text metric is computed under all three and
``--reference-mode`` picks the headline:

- ``max``: each example keeps its best reference (the DialogSum paper; ``rouge_score``'s
  ``score_multi``; SQuAD's exact match and F1). For BLEU and chrF, ``sacrebleu``'s own multi-reference
  scoring (every reference counts at once).
- ``mean``: each reference is scored as its own row (prediction repeated), then averaged over all
  rows: the protocol of the course lab's DialogSum figures (and of Hugging Face ``evaluate`` run on
  one row per reference).
- ``first``: only the first reference of each example.

With one reference per example the three agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal

REFERENCE_MODES = ("max", "mean", "first")
ReferenceMode = Literal["max", "mean", "first"]


@dataclass(frozen=True)
class Metric:
    """One metric: what it writes into metrics.json, what it means, which library computes it.

    ``score(predictions, references)`` takes parallel lists (one reference per row) and returns the
    corpus value of each key, as a fraction in [0, 1] where the metric has one. ``per_row=True``: the
    corpus value is the mean of per-row values, and ``score`` on a single row gives that row's value
    (used for the ``max`` mode and for predictions.jsonl). ``model=True``: computed from the model's
    loss on the references, not from generated text (``score`` is then unused). A corpus-level metric
    (``per_row=False``) gives ``multi_reference(predictions, reference lists)``: its library's own way
    of scoring several references at once, used for the ``max`` mode.
    """

    keys: tuple[str, ...]
    about: str
    library: str
    score: Callable[..., dict[str, float]] | None = None
    per_row: bool = False
    model: bool = False
    multi_reference: Callable[..., dict[str, float]] | None = None
    needs: tuple[str, str] | None = None  # (module, package): checked before anything is generated


@dataclass
class ScoringSettings:
    """What is scored and how.

    Args:
        metrics: Metrics to compute (comma-separated): rouge (ROUGE-1/2/L/Lsum, rouge-score), exact_match
            and token_f1 (SQuAD's normalised exact match and token F1, for short answers; torchmetrics),
            bleu and chrf (sacrebleu), accuracy and macro_f1 (label classification; scikit-learn), loss
            and perplexity (held-out cross-entropy of the first reference given the prompt), bertscore (needs
            the bert-score package and bertscore_model, a local model directory).
        reference_mode: How an example with several references is scored, for the headline numbers (all
            three are written to metrics.json as KEY_max, KEY_mean, KEY_first): max keeps the best
            reference (the DialogSum paper; sacrebleu's multi-reference BLEU/chrF); mean scores each
            reference as its own row and averages (the course lab's protocol); first uses the first only.
            Compare with published numbers only under the protocol they used.
        bertscore_model: Local directory of the model BERTScore embeds with (e.g. a saved roberta-large);
            nothing is downloaded.
    """

    metrics: list[str] = field(default_factory=lambda: ["rouge"])
    reference_mode: ReferenceMode = "max"
    bertscore_model: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.metrics, str):
            self.metrics = [m.strip() for m in self.metrics.split(",") if m.strip()]
        if not self.metrics:
            raise ValueError(f"--metrics is empty; choose from {', '.join(METRICS)}.")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"Unknown metric(s) {', '.join(unknown)} in --metrics; choose from {', '.join(METRICS)}.")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"--metrics lists a metric twice: {','.join(self.metrics)}.")
        if self.reference_mode not in REFERENCE_MODES:
            raise ValueError(f"reference_mode must be one of {', '.join(REFERENCE_MODES)}, got {self.reference_mode!r}.")
        if "bertscore" in self.metrics and not self.bertscore_model:
            raise ValueError("bertscore needs --bertscore-model DIR, a local copy of the model it embeds with "
                             "(e.g. roberta-large saved with save_pretrained); nothing is downloaded.")


# --- the library calls ----------------------------------------------------------------------------------
def _require(module: str, package: str):
    """Import ``module``, or say which package (in peftkit's ``metrics`` extra) to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"This metric needs the {package} package: pip install 'peftkit[metrics]' (or pip install {package}).") from None


def _rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    from .rouge import ROUGE_TYPES, sentences_on_lines

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rows = [scorer.score(sentences_on_lines(r), sentences_on_lines(p)) for p, r in zip(predictions, references, strict=True)]
    return {k: sum(s[k].fmeasure for s in rows) / len(rows) for k in ROUGE_TYPES}


def _squad(predictions: list[str], references: list[str]) -> dict[str, float]:
    squad = _require("torchmetrics.functional.text", "torchmetrics").squad
    preds = [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)]
    target = [{"answers": {"text": [r], "answer_start": [0]}, "id": str(i)} for i, r in enumerate(references)]
    out = squad(preds, target)  # percentages
    return {"exact_match": out["exact_match"].item() / 100, "token_f1": out["f1"].item() / 100}


def _bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    sacrebleu = _require("sacrebleu", "sacrebleu")
    return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score / 100}


def _chrf(predictions: list[str], references: list[str]) -> dict[str, float]:
    sacrebleu = _require("sacrebleu", "sacrebleu")
    return {"chrf": sacrebleu.corpus_chrf(predictions, [references]).score / 100}


def _labels(predictions: list[str], references: list[str]) -> dict[str, float]:
    sklearn_metrics = _require("sklearn.metrics", "scikit-learn")
    y_true, y_pred = [r.strip() for r in references], [p.strip() for p in predictions]
    return {"accuracy": float(sklearn_metrics.accuracy_score(y_true, y_pred)),
            "macro_f1": float(sklearn_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0))}


def _bleu_multi(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    sacrebleu = _require("sacrebleu", "sacrebleu")
    return {"bleu": sacrebleu.corpus_bleu(predictions, _streams(references)).score / 100}


def _chrf_multi(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    sacrebleu = _require("sacrebleu", "sacrebleu")
    return {"chrf": sacrebleu.corpus_chrf(predictions, _streams(references)).score / 100}


def _streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: one stream per reference position; ``None`` where an example has fewer."""
    width = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def _labels_multi(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """A prediction that equals any of its references counts as that label (else the first)."""
    chosen = [p if p.strip() in {r.strip() for r in refs} else refs[0] for p, refs in zip(predictions, references, strict=True)]
    return _labels(predictions, chosen)


def _bertscore(predictions: list[str], references: list[str] | list[list[str]], model_dir: str) -> dict[str, float]:
    try:
        import bert_score
    except ImportError:
        raise ValueError("bertscore needs the bert-score package (pip install bert-score) and --bertscore-model DIR.") from None
    from transformers import AutoConfig

    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"--bertscore-model {model_dir!r} is not a local model directory (no config.json); "
                         "save one with save_pretrained first: nothing is downloaded.")
    layers = AutoConfig.from_pretrained(model_dir, local_files_only=True).num_hidden_layers
    # A list of reference lists makes bert-score keep each example's best reference.
    _, _, f1 = bert_score.score(predictions, references, model_type=model_dir, num_layers=layers, verbose=False)
    return {"bertscore_f1": f1.mean().item()}


METRICS: dict[str, Metric] = {
    "rouge": Metric(("rouge1", "rouge2", "rougeL", "rougeLsum"), "ROUGE-1/2/L/Lsum F-measure, stemmed", "rouge-score",
                    _rouge, per_row=True),
    "exact_match": Metric(("exact_match",), "SQuAD exact match after normalisation (case, punctuation, articles)",
                          "torchmetrics (SQuAD)", _squad, per_row=True, needs=("torchmetrics", "torchmetrics")),
    "token_f1": Metric(("token_f1",), "SQuAD token-overlap F1 after the same normalisation", "torchmetrics (SQuAD)",
                       _squad, per_row=True, needs=("torchmetrics", "torchmetrics")),
    "bleu": Metric(("bleu",), "corpus BLEU (13a tokenizer), / 100", "sacrebleu", _bleu, multi_reference=_bleu_multi,
                   needs=("sacrebleu", "sacrebleu")),
    "chrf": Metric(("chrf",), "corpus chrF (character n-gram F-score, beta 2), / 100", "sacrebleu", _chrf,
                   multi_reference=_chrf_multi, needs=("sacrebleu", "sacrebleu")),
    "accuracy": Metric(("accuracy",), "share of predictions equal to the label (whitespace stripped)", "scikit-learn",
                       _labels, multi_reference=_labels_multi, needs=("sklearn", "scikit-learn")),
    "macro_f1": Metric(("macro_f1",), "F1 per label, averaged over labels", "scikit-learn", _labels,
                       multi_reference=_labels_multi, needs=("sklearn", "scikit-learn")),
    "loss": Metric(("loss",), "mean per-token cross-entropy of the first reference given the prompt (teacher forcing)",
                   "torch", model=True),
    "perplexity": Metric(("perplexity",), "exp(loss)", "torch", model=True),
    "bertscore": Metric(("bertscore_f1",), "BERTScore F1 (needs bert-score and a local model)", "bert-score",
                        _bertscore, multi_reference=_bertscore, needs=("bert_score", "bert-score")),
}


def check_available(names: list[str]) -> None:
    """Refuse, before anything is generated, a metric whose library is not installed (with the fix)."""
    import importlib.util

    missing = sorted({METRICS[n].needs[1] for n in names if METRICS[n].needs and importlib.util.find_spec(METRICS[n].needs[0]) is None})
    if missing:
        extra = "" if missing == ["bert-score"] else "pip install 'peftkit[metrics]', or "
        raise ValueError(f"--metrics {','.join(names)} needs {', '.join(missing)}, which is not installed: "
                         f"{extra}pip install {' '.join(missing)}.")


def metric_keys(names: list[str] | None = None) -> list[str]:
    """The metrics.json keys of ``names`` (all metrics by default), in registry order."""
    return [k for name, m in METRICS.items() if names is None or name in names for k in m.keys]


def score_fields() -> list[str]:
    """Every score key metrics.json may hold: each metric's headline, then each text metric's KEY_MODE."""
    text = [k for m in METRICS.values() if not m.model for k in m.keys]
    return [*metric_keys(), *(f"{k}_{mode}" for mode in REFERENCE_MODES for k in text)]


def score_text(predictions: list[str], references: list[list[str]], settings: ScoringSettings) -> tuple[dict[str, float], list[dict[str, float]]]:
    """``(corpus scores, per-example scores)`` of the text metrics in ``settings``.

    Corpus scores hold ``KEY_max``, ``KEY_mean`` and ``KEY_first`` for every key, and ``KEY`` (the
    headline, under ``settings.reference_mode``). Per-example scores (per-row metrics only) use the
    headline mode too: the best reference, the mean over the references, or the first.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists.")
    if not predictions:
        raise ValueError("Nothing to score: no predictions.")
    if any(not refs for refs in references):
        raise ValueError("An example has no reference to score against.")
    wanted = metric_keys(settings.metrics)
    scores: dict[str, float] = {}
    per_example: list[dict[str, float]] = [{} for _ in predictions]
    groups: dict[Any, Metric] = {}  # metrics computed by one library call (exact_match and token_f1) run it once
    for name in settings.metrics:
        metric = METRICS[name]
        if not metric.model:
            groups.setdefault(metric.score, metric)
    for metric in groups.values():
        extra = {"model_dir": settings.bertscore_model} if metric.score is _bertscore else {}
        score = partial(metric.score, **extra)
        multi = partial(metric.multi_reference, **extra) if metric.multi_reference else None
        for mode, (corpus, rows) in by_reference_mode(score, predictions, references, metric.per_row, multi).items():
            for k in (k for k in wanted if k in corpus):
                scores[f"{k}_{mode}"] = corpus[k]
                if mode == settings.reference_mode:
                    scores[k] = corpus[k]
                    for row, value in zip(per_example, rows or [], strict=False):
                        row[k] = value[k]
    order = wanted + [f"{k}_{mode}" for mode in REFERENCE_MODES for k in wanted]  # headline first, then each mode
    return {k: scores[k] for k in order if k in scores}, per_example


def by_reference_mode(score: Callable, predictions: list[str], references: list[list[str]], per_row: bool,
                      multi_reference: Callable | None = None) -> dict[str, tuple[dict[str, float], list[dict[str, float]] | None]]:
    """``{mode: (corpus scores, per-example scores or None)}`` for the three reference modes.

    ``per_row``: ``score`` of one row is that row's value and the corpus value is the mean over rows, so
    ``max`` is the per-example best; otherwise ``multi_reference(predictions, reference lists)`` is the
    library's own multi-reference score.
    """
    first = [refs[0] for refs in references]
    pooled_predictions = [p for p, refs in zip(predictions, references, strict=True) for _ in refs]
    pooled_references = [r for refs in references for r in refs]
    if not per_row:
        if multi_reference is None:
            raise ValueError("a corpus metric needs its multi_reference scorer for the max mode")
        return {"max": (multi_reference(predictions, references), None),
                "mean": (score(pooled_predictions, pooled_references), None),
                "first": (score(predictions, first), None)}
    pairs = [[score([p], [r]) for r in refs] for p, refs in zip(predictions, references, strict=True)]
    keys = list(pairs[0][0])
    best = [{k: max(s[k] for s in rows) for k in keys} for rows in pairs]
    mean = [{k: sum(s[k] for s in rows) / len(rows) for k in keys} for rows in pairs]
    firsts = [rows[0] for rows in pairs]
    return {"max": (_average(best, keys), best),
            "mean": (_average([s for rows in pairs for s in rows], keys), mean),  # each reference its own row
            "first": (_average(firsts, keys), firsts)}


def _average(rows: list[dict[str, float]], keys: list[str]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


__all__ = ["METRICS", "REFERENCE_MODES", "Metric", "ScoringSettings", "by_reference_mode", "check_available", "metric_keys", "score_fields", "score_text"]
