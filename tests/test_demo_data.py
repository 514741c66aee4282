"""Checks on the original demo dialogue-summarization data in src/peftkit/data/demo/."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "src" / "peftkit" / "data" / "demo"
FILES = {"train": DEMO / "demo_train.jsonl", "eval": DEMO / "demo_eval.jsonl"}
FIELDS = {"id", "dialogue", "summary", "topic"}
# The real DialogSum files live beside the repository, never inside it. The environment variable
# only exists so the check can also run from a checkout that is not next to shared/.
DIALOGSUM = Path(os.environ.get("PEFTKIT_DIALOGSUM_DIR") or REPO.parent / "shared" / "data" / "dialogsum")

TURN = re.compile(r"^#Person[1-9]#: \S")
SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z#\"']|\s*$)")
NGRAM = 12


def _load(path: Path) -> list[dict]:
    assert path.is_file(), f"missing {path}"
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            assert line.endswith("\n") and line.strip(), f"{path.name}:{n}: blank or unterminated line"
            rows.append(json.loads(line))
    return rows


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {name: _load(path) for name, path in FILES.items()}


@pytest.fixture(scope="module")
def rows(splits) -> list[dict]:
    return splits["train"] + splits["eval"]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _tokens(dialogue: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", re.sub(r"#Person\d#:", " ", dialogue).lower())


def test_fields_and_types(splits):
    for name, data in splits.items():
        for row in data:
            assert isinstance(row, dict), f"{name}: not an object: {row!r}"
            assert set(row) == FIELDS, f"{name} {row.get('id')}: fields {sorted(row)}"
            for key in FIELDS:
                assert isinstance(row[key], str) and row[key].strip(), f"{name} {row['id']}: empty {key}"
            assert re.fullmatch(rf"demo_{name}_\d{{4}}", row["id"]), f"{name}: bad id {row['id']}"


def test_counts(splits):
    assert len(splits["train"]) >= 170
    assert len(splits["eval"]) >= 40
    assert len(splits["train"]) + len(splits["eval"]) >= 210


def test_ids_unique(rows):
    ids = [r["id"] for r in rows]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"duplicate ids: {dupes}"


def test_no_dialogue_in_both_splits(splits):
    train = {_norm(r["dialogue"]) for r in splits["train"]}
    shared = [r["id"] for r in splits["eval"] if _norm(r["dialogue"]) in train]
    assert not shared, f"eval dialogues also in train: {shared}"
    everything = [_norm(r["dialogue"]) for r in splits["train"] + splits["eval"]]
    assert len(set(everything)) == len(everything), "a dialogue is repeated"


def test_dialogue_turns(rows):
    for row in rows:
        turns = row["dialogue"].split("\n")
        assert 4 <= len(turns) <= 14, f"{row['id']}: {len(turns)} turns"
        for turn in turns:
            assert TURN.match(turn), f"{row['id']}: bad turn {turn[:60]!r}"
        speakers = {t.split(":", 1)[0] for t in turns}
        assert {"#Person1#", "#Person2#"} <= speakers, f"{row['id']}: speakers {sorted(speakers)}"
        words = len(re.sub(r"#Person\d#: ", "", row["dialogue"]).split())
        assert 40 <= words <= 260, f"{row['id']}: {words} words"


def test_summaries(rows):
    for row in rows:
        summary = row["summary"].strip()
        assert summary, f"{row['id']}: empty summary"
        assert summary[-1] in ".!?", f"{row['id']}: summary does not end a sentence"
        sentences = len(SENTENCE_END.findall(summary))
        assert 1 <= sentences <= 2, f"{row['id']}: {sentences} sentences: {summary!r}"
        assert "#Person1#" in summary, f"{row['id']}: summary never mentions #Person1#"
        assert 8 <= len(summary.split()) <= 60, f"{row['id']}: summary length {len(summary.split())}"
        assert "#" not in re.sub(r"#Person\d#", "", summary), f"{row['id']}: malformed speaker tag"
        # Every speaker tag the summary uses must be a speaker in the dialogue.
        for tag in set(re.findall(r"#Person\d#", summary)):
            assert f"\n{tag}: " in "\n" + row["dialogue"], f"{row['id']}: summary names absent {tag}"


def test_topics(rows):
    for row in rows:
        topic = row["topic"]
        assert topic.strip() == topic and topic, f"{row['id']}: topic {topic!r}"
        assert topic == topic.lower(), f"{row['id']}: topic not lowercase: {topic!r}"
        assert 1 <= len(topic.split()) <= 3, f"{row['id']}: topic {topic!r}"
    distinct = {r["topic"] for r in rows}
    assert len(distinct) >= 60, f"only {len(distinct)} distinct topics"


def test_readme_present():
    text = (DEMO / "README.md").read_text(encoding="utf-8")
    assert "Apache-2.0" in text


def test_no_ngram_shared_with_dialogsum(rows):
    sources = [DIALOGSUM / f"{split}.jsonl" for split in ("dev", "test")]
    sources = [p for p in sources if p.is_file()]
    if not sources:
        pytest.skip(f"DialogSum files not found under {DIALOGSUM}")
    reference: set[tuple[str, ...]] = set()
    for path in sources:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                toks = _tokens(json.loads(line)["dialogue"])
                reference.update(tuple(toks[i : i + NGRAM]) for i in range(len(toks) - NGRAM + 1))
    assert len(reference) > 1000, "DialogSum files were found but yielded almost no n-grams"
    hits = []
    for row in rows:
        toks = _tokens(row["dialogue"])
        for i in range(len(toks) - NGRAM + 1):
            gram = tuple(toks[i : i + NGRAM])
            if gram in reference:
                hits.append(f"{row['id']}: {' '.join(gram)}")
                break
    assert not hits, "demo dialogues share 12-word sequences with DialogSum:\n" + "\n".join(hits)
