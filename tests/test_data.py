"""Data files, prompts, label masking, truncation and batching."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_pipeline as tiny
from peftkit.data import (
    IGNORE_INDEX,
    BatchStream,
    PromptEncoder,
    PromptFormat,
    batch_plan,
    collate_for_training,
    collate_prompts,
    encode_examples,
    read_examples,
    read_rows,
)

ROWS = [{"dialogue": "alice buys a book", "summary": "alice buys ."}, {"dialogue": "bob sells a car", "summary": "bob sells ."}]


# --- reading files -------------------------------------------------------------------------------------
def test_jsonl_json_and_csv_give_the_same_rows(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n", encoding="utf-8")
    (tmp_path / "a.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    (tmp_path / "a.csv").write_text("dialogue,summary\n" + "".join(f'"{r["dialogue"]}","{r["summary"]}"\n' for r in ROWS), encoding="utf-8")
    for name in ("a.jsonl", "a.json", "b.json", "a.csv"):
        assert read_rows(str(tmp_path / name)) == ROWS, name


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.jsonl", b"", r"empty.jsonl has no rows"),
        ("blank.jsonl", b"\n\n", r"blank.jsonl has no rows"),
        ("latin1.jsonl", '{"dialogue": "ok"}\n{"dialogue": "caf\xe9"}\n'.encode("latin-1"), r"latin1.jsonl: line 2 is not UTF-8"),
        ("list.jsonl", b'{"dialogue": "a", "summary": "b"}\n["a", "b"]\n', r"list.jsonl: row 2 is a JSON list, not an object"),
        ("bad.jsonl", b'{"dialogue": "a"}\n{"dialogue": \n', r"bad.jsonl: line 2 is not valid JSON"),
        ("nums.json", b"[1, 2]", r"nums.json: row 1 is a JSON number, not an object"),
        ("data.txt", b"hello", r"unknown data format '.txt'"),
    ],
)
def test_bad_files_are_named_with_row(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=expected):
        read_examples(str(tmp_path / name))


@pytest.mark.parametrize(
    "name, content, expected",
    [  # each was read silently wrong, or failed with a message that named neither row nor field
        ("last.csv", 'dialogue,summary\na,"b\nc,d\ne,f\n', r"last.csv: row 1 \(line 2\), field 'summary': a quoted field opened on line 2 is never closed"),
        ("first.csv", 'dialogue,summary\na,b\n"c,d\ne,f\n', r"first.csv: row 2 \(line 3\), field 'dialogue': a quoted field opened on line 3 is never closed"),
        ("dup.csv", "dialogue,summary,summary\na,b,c\n", r"dup.csv: the header \(line 1\) names the field 'summary' twice \(columns 2 and 3\)"),
        ("short.csv", "dialogue,summary\na,b\nc\n", r"short.csv: row 2 \(line 3\) has 1 fields, the header has 2: the field 'summary' is missing"),
        ("text.csv", 'dialogue,summary\na,"b"c\n', r"text.csv: row 1 \(line 2\), field 'summary': .*quote doubled"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, r"deep.json: lists or objects are nested too deeply to read \(100000 levels\)"),
        ("deep.jsonl", '{"dialogue": "a", "summary": "b"}\n{"x": ' + "[" * 100_000 + "]" * 100_000 + "}\n", r"deep.jsonl: line 2 nests"),
    ],
)
def test_malformed_csv_and_json_name_file_row_and_field(tmp_path, name, content, expected):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=expected):
        read_rows(str(tmp_path / name))


def test_csv_reads_long_fields_and_quoted_line_breaks(tmp_path):
    long = "alice " * 40_000  # 240 KB, past the csv module's 128 KiB default field limit
    (tmp_path / "a.csv").write_text(f'dialogue,summary\n"{long}",b\n"two\nlines","say ""hi"" ok"\nplain "quotes" inside,x\n')
    assert read_rows(str(tmp_path / "a.csv")) == [
        {"dialogue": long, "summary": "b"}, {"dialogue": "two\nlines", "summary": 'say "hi" ok'},
        {"dialogue": 'plain "quotes" inside', "summary": "x"},
    ]


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_examples("/no/such/file.jsonl")


def test_missing_or_wrong_fields_name_file_row_and_field(tmp_path):
    path = tiny.write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"text": "x", "summary": "y"}])
    with pytest.raises(ValueError, match=r"d.jsonl: row 2 has no field 'dialogue'; its fields are \['summary', 'text'\]. Set --input-field"):
        read_examples(path)
    path = tiny.write_jsonl(tmp_path / "e.jsonl", [ROWS[0], {"dialogue": "x"}])
    with pytest.raises(ValueError, match=r"e.jsonl: row 2 has no field 'summary' \(nor summary1"):
        read_examples(path)
    path = tiny.write_jsonl(tmp_path / "f.jsonl", [{"dialogue": 5, "summary": "y"}])
    with pytest.raises(ValueError, match=r"f.jsonl: row 1, field 'dialogue' is a number, expected text"):
        read_examples(path)
    path = tiny.write_jsonl(tmp_path / "g.jsonl", [{"dialogue": "x", "summary": "  "}])
    with pytest.raises(ValueError, match=r"g.jsonl: row 1, field 'summary' is empty"):
        read_examples(path)


def test_custom_fields_and_several_references(tmp_path):
    path = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.dialogue_rows(3, references=3))
    examples = read_examples(path)
    assert [len(e.references) for e in examples] == [3, 3, 3]
    assert examples[0].target == examples[0].fields["summary1"]  # training learns the first reference
    path = tiny.write_jsonl(tmp_path / "c.jsonl", [{"text": "hello there", "label": "greeting"}])
    (example,) = read_examples(path, input_field="text", target_field="label")
    assert (example.source, example.references, example.row) == ("hello there", ["greeting"], 1)
    unlabeled = tiny.write_jsonl(tmp_path / "u.jsonl", [{"dialogue": "hi"}])
    assert read_examples(unlabeled, require_target=False)[0].references == []


# --- prompts, masking, truncation ------------------------------------------------------------------------
def _example(tmp_path, rows=None):
    return read_examples(tiny.write_jsonl(tmp_path / "x.jsonl", rows or tiny.dialogue_rows(4)))


@pytest.mark.parametrize("chat", [False, True])
def test_causal_labels_mask_the_prompt_exactly(tmp_path, chat):
    tok = tiny.tokenizer(chat_template=chat)
    examples = _example(tmp_path)
    encoded = encode_examples(examples, tok, PromptFormat(), seq2seq=False)
    for example, e in zip(examples, encoded.items):
        assert len(e.input_ids) == len(e.labels)
        assert e.labels[: e.prompt_length] == [IGNORE_INDEX] * e.prompt_length
        target = e.labels[e.prompt_length :]
        assert target == e.input_ids[e.prompt_length :] and IGNORE_INDEX not in target
        assert target[-1] == tok.eos_token_id
        assert tok.decode(target[:-1]) == example.target
        assert e.num_targets == len(target)
        prompt = tok.decode(e.prompt_ids)
        assert prompt.startswith("user : summarize") == chat  # the chat template wraps the prompt
        assert prompt.endswith("assistant :" if chat else "summary :")


def test_chat_template_can_be_switched_off(tmp_path):
    tok = tiny.tokenizer(chat_template=True)
    (e,) = encode_examples(_example(tmp_path)[:1], tok, PromptFormat(chat_template=False), seq2seq=False).items
    assert not tok.decode(e.prompt_ids).startswith("user")


def test_seq2seq_encoding(tmp_path):
    tok = tiny.tokenizer(seq2seq=True)
    examples = _example(tmp_path)
    for example, e in zip(examples, encode_examples(examples, tok, PromptFormat(), seq2seq=True).items):
        assert e.prompt_length == len(e.input_ids) and e.input_ids[-1] == tok.eos_token_id
        assert e.labels[-1] == tok.eos_token_id and tok.decode(e.labels[:-1]) == example.target


def test_template_uses_row_fields_and_reports_missing_ones(tmp_path):
    tok = tiny.tokenizer()
    examples = _example(tmp_path)
    fmt = PromptFormat(template="{topic} : {dialogue} summary :")
    (e, *_) = encode_examples(examples, tok, fmt, seq2seq=False).items
    assert tok.decode(e.prompt_ids).startswith(examples[0].fields["topic"] + " : # person1")
    with pytest.raises(ValueError, match=r"template uses \{speaker\}, but row 1 has no field 'speaker'"):
        encode_examples(examples, tok, PromptFormat(template="{speaker}: {input}"), seq2seq=False)
    with pytest.raises(ValueError, match="named fields"):
        PromptFormat(template="{0} {input}")


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_cuts_the_input_not_the_template(tmp_path, side):
    tok = tiny.tokenizer()
    long = {"dialogue": " ".join(["alice"] + ["okay"] * 40 + ["bob"]), "summary": "alice ."}
    examples = _example(tmp_path, [long, {"dialogue": "hi", "summary": "x ."}])
    fmt = PromptFormat(max_source_tokens=20, truncation_side=side)
    encoded = encode_examples(examples, tok, fmt, seq2seq=False)
    assert encoded.truncated_inputs == 1
    assert "1 of 2 inputs were longer than max_source_tokens=20" in encoded.describe()
    e = encoded.items[0]
    assert e.prompt_length <= 20
    text = tok.decode(e.prompt_ids)
    assert text.startswith("summarize the following conversation .") and text.endswith("summary :")
    assert ("alice" in text) == (side == "right") and ("bob" in text) == (side == "left")
    assert tok.decode(e.labels[e.prompt_length : -1]) == "alice ."  # the target is whole


def test_long_targets_keep_their_end_of_sequence(tmp_path):
    tok = tiny.tokenizer()
    examples = _example(tmp_path, [{"dialogue": "hi", "summary": " ".join(["okay"] * 30)}])
    encoded = encode_examples(examples, tok, PromptFormat(max_target_tokens=8), seq2seq=False)
    e = encoded.items[0]
    assert encoded.truncated_targets == 1 and e.num_targets == 8 and e.labels[-1] == tok.eos_token_id


def test_template_longer_than_the_limit_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="template alone"):
        encode_examples(_example(tmp_path), tiny.tokenizer(), PromptFormat(max_source_tokens=4), seq2seq=False)


def test_prompt_format_validates():
    with pytest.raises(ValueError, match="truncation_side"):
        PromptFormat(truncation_side="middle")
    with pytest.raises(ValueError, match="max_source_tokens"):
        PromptFormat(max_source_tokens=0)


# --- batches ---------------------------------------------------------------------------------------------
def test_collate_pads_dynamically(tmp_path):
    tok = tiny.tokenizer()
    items = encode_examples(_example(tmp_path), tok, PromptFormat(), seq2seq=False).items[:3]
    batch = collate_for_training(items, tok.pad_token_id)
    longest = max(len(e.input_ids) for e in items)
    assert batch["input_ids"].shape == (3, longest)  # padded to this batch's longest, not a fixed length
    for row, e in enumerate(items):
        n = len(e.input_ids)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
    prompts = collate_prompts(items, tok.pad_token_id, padding_side="left")
    for row, e in enumerate(items):
        assert prompts["input_ids"][row, -e.prompt_length :].tolist() == e.prompt_ids  # left padding: prompt ends last


def test_batch_plan_is_a_seeded_permutation_grouped_by_length():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    plan = batch_plan(lengths, 8, seed=1, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(200))
    assert plan == batch_plan(lengths, 8, seed=1, epoch=0)
    assert plan != batch_plan(lengths, 8, seed=1, epoch=1) and plan != batch_plan(lengths, 8, seed=2, epoch=0)
    assert max(lengths[i] for i in plan[0]) == max(lengths)  # the longest batch runs first

    def padding(p):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in p)

    random_plan = batch_plan(lengths, 8, seed=1, epoch=0, group_by_length=False)
    assert sorted(i for b in random_plan for i in b) == list(range(200))
    assert padding(plan) < 0.2 * padding(random_plan)


def test_batch_stream_continues_across_epochs_and_drops_too_small_batches():
    lengths = list(range(1, 11))  # 10 examples, batches of 4: 4, 4, 2
    stream = BatchStream(lengths, 4, seed=0, min_rows=3)
    assert stream.batches_per_epoch == 2  # the 2-row batch cannot feed 3 micro-batches/processes
    epoch0 = [stream.batch(0), stream.batch(1)]
    assert stream.batch(2) == [b for b in batch_plan(lengths, 4, 0, 1) if len(b) >= 3][0]  # epoch 1 starts
    assert [stream.batch(0), stream.batch(1)] == epoch0
    with pytest.raises(ValueError, match="too few"):
        BatchStream([1, 2], 4, seed=0, min_rows=3)


def test_encoder_counts_targets_like_the_shifted_loss(tmp_path):
    tok = tiny.tokenizer()
    items = encode_examples(_example(tmp_path), tok, PromptFormat(), seq2seq=False).items
    batch = collate_for_training(items, tok.pad_token_id)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == sum(e.num_targets for e in items)
    assert isinstance(PromptEncoder(tok, PromptFormat(), False).render(_example(tmp_path)[0]), str)
    assert torch.is_tensor(batch["labels"])
