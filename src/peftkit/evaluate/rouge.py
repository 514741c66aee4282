"""ROUGE-1/2/L/Lsum with the ``rouge-score`` package (Google's reference implementation).

Stemming is on. With several references (DialogSum's test split has three), each example keeps its
best score per metric, as in the DialogSum paper. ROUGE-Lsum scores sentence by sentence and expects
sentences on separate lines; NLTK's sentence splitter needs data that cannot be downloaded here, so
sentences are split with a regular expression at ``.``, ``!`` or ``?`` followed by whitespace.
"""

from __future__ import annotations

import re

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences_on_lines(text: str) -> str:
    """``"Tom is ill. He stays home."`` -> ``"Tom is ill.\\nHe stays home."`` (what ROUGE-Lsum needs)."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge_per_example(predictions: list[str], references: list[list[str]]) -> list[dict[str, float]]:
    """F-measures per example: ``[{"rouge1": f, "rouge2": f, "rougeL": f, "rougeLsum": f}, ...]``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists.")
    from rouge_score import rouge_scorer  # here, not at the top: it imports NLTK, SciPy and scikit-learn (2.3 s)

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out = []
    for prediction, refs in zip(predictions, references, strict=True):
        if not refs:
            raise ValueError("An example has no reference to score against.")
        best = scorer.score_multi([sentences_on_lines(r) for r in refs], sentences_on_lines(prediction))
        out.append({k: best[k].fmeasure for k in ROUGE_TYPES})
    return out


def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean F-measure of each ROUGE type over the examples (fractions in [0, 1]), plus ``n``."""
    scores = rouge_per_example(predictions, references)
    n = len(scores)
    return {**{k: (sum(s[k] for s in scores) / n if n else 0.0) for k in ROUGE_TYPES}, "n": n}
