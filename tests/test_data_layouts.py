"""Data layouts: chat messages (loss on assistant turns only), prompt/completion, instruction rows, class labels."""

from __future__ import annotations


import pytest

import tiny_pipeline as tiny
from conftest import build
from peftkit.data import IGNORE_INDEX, PromptFormat, load_encoded, load_examples
from peftkit.hub import cached_path, is_cached
from peftkit.train import TrainConfig, train
from peftkit.train import loop as loop_module

# A role-aware chat template in the tiny tokenizer's words: "user : hi </s> assistant : hello </s> ".
ROLE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ' : ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant : ' }}{% endif %}"
)
CHATS = [
    [{"role": "system", "content": "please help"}, {"role": "user", "content": "alice buys a book ?"},
     {"role": "assistant", "content": "yes alice buys a book ."}, {"role": "user", "content": "bob sells a car ?"},
     {"role": "assistant", "content": "no ."}, {"role": "user", "content": "and carol ?"},
     {"role": "assistant", "content": "carol finds a dog today ."}],
    [{"role": "user", "content": "dave needs a ticket"}, {"role": "assistant", "content": "okay dave"}],
]


def chat_tokenizer():
    tok = tiny.tokenizer()
    tok.chat_template = ROLE_TEMPLATE
    return tok


def expected(tok, turns, learn_all):
    """Token ids and labels worked out turn by turn (not through peftkit): -100 except on the learned
    assistant turns, whose content and end-of-turn token are the labels."""
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    ids, labels = [], []
    for i, turn in enumerate(turns):
        header = tok(f"{turn['role']} :", add_special_tokens=False)["input_ids"]
        body = tok(turn["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        learned = turn["role"] == "assistant" and (learn_all or i == last)
        ids += header + body
        labels += [IGNORE_INDEX] * len(header) + (body if learned else [IGNORE_INDEX] * len(body))
    return ids, labels


@pytest.mark.parametrize("turns", ["all", "last"])
def test_messages_learn_exactly_the_assistant_turns(tmp_path, turns):
    tok = chat_tokenizer()
    path = tiny.write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    examples, encoded = load_encoded(path, tok, PromptFormat(assistant_turns=turns), seq2seq=False)
    assert encoded.format.layout == "messages" and encoded.chat_template_used
    assert "chat messages (field 'messages')" in encoded.notes[0]
    for messages, example, e in zip(CHATS, examples, encoded.items):
        ids, labels = expected(tok, messages, turns == "all")
        assert e.input_ids == ids and e.labels == labels
        assert e.input_ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        assert example.references == [messages[-1]["content"]]
        # generation is given everything before the last answer, ending with the assistant header
        assert tok.decode(e.prompt_ids).endswith("assistant :")
    first = encoded.items[0]
    learned = tok.decode([t for t in first.labels if t != IGNORE_INDEX])
    assert learned == ("yes alice buys a book . </s> no . </s> carol finds a dog today . </s>" if turns == "all"
                       else "carol finds a dog today . </s>")
    # without targets (evaluation): exactly the training prompt
    _, prompts = load_encoded(path, tok, PromptFormat(assistant_turns=turns), seq2seq=False, with_target=False)
    assert [p.input_ids for p in prompts.items] == [e.prompt_ids for e in encoded.items]


@pytest.mark.skipif(not is_cached("smollm2-135m-instruct"), reason="SmolLM2 is not in the local model cache")
@pytest.mark.parametrize("turns", ["all", "last"])
def test_messages_with_smollm2s_chat_template(tmp_path, turns):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cached_path("smollm2-135m-instruct")))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}]
    path = tiny.write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    _, encoded = load_encoded(path, tok, PromptFormat(assistant_turns=turns), seq2seq=False)
    (e,) = encoded.items
    text = tok.apply_chat_template(messages, tokenize=False)
    assert e.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    learned = tok.decode([t for t in e.labels if t != IGNORE_INDEX])
    assert learned == ("Hello!<|im_end|>\n4<|im_end|>\n" if turns == "all" else "4<|im_end|>\n")
    assert tok.decode(e.prompt_ids) == tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("turns", ["all", "last"])
def test_training_on_a_messages_file_trains_only_assistant_tokens(tmp_path, monkeypatch, turns):
    model_dir = tmp_path / "tiny-chat"
    build("llama").save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    path = tiny.write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    batches = []
    collate = loop_module.collate_for_training
    monkeypatch.setattr(loop_module, "collate_for_training", lambda items, pad: batches.append(collate(items, pad)) or batches[-1])
    run = train(TrainConfig(model=str(model_dir), data=path, output=str(tmp_path / "out"), max_steps=2, batch_size=2,
                            precision="fp32", format=PromptFormat(assistant_turns=turns)))
    assert run["format"]["layout"] == "messages" and run["format"]["assistant_turns"] == turns
    tok = chat_tokenizer()
    wanted = {tuple(expected(tok, m, turns == "all")[0]): expected(tok, m, turns == "all")[1] for m in CHATS}
    seen = 0
    for batch in batches:
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            n = int(mask.sum())
            assert labels[:n].tolist() == wanted[tuple(ids[:n].tolist())]  # -100 everywhere but the assistant turns
            assert (labels[n:] == IGNORE_INDEX).all()
            seen += 1
    assert seen == 4


def test_long_conversations_lose_their_oldest_exchanges(tmp_path):
    tok = chat_tokenizer()
    path = tiny.write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[0]}])
    fmt = PromptFormat(max_source_tokens=26)
    _, encoded = load_encoded(path, tok, fmt, seq2seq=False)
    (e,) = encoded.items
    assert encoded.truncated_inputs == 1 and e.prompt_length == 26
    kept = CHATS[0][:1] + CHATS[0][3:]  # the system turn stays; the first exchange goes
    assert (e.input_ids, e.labels) == expected(tok, kept, True)
    _, prompts = load_encoded(path, tok, fmt, seq2seq=False, with_target=False)
    assert prompts.items[0].input_ids == e.prompt_ids
    with pytest.raises(ValueError, match="Row 1: its last user turn .* needs 13 tokens, more than max_source_tokens=8"):
        load_encoded(path, tok, PromptFormat(max_source_tokens=8), seq2seq=False)


def test_messages_without_a_chat_template_use_plain_role_lines(tmp_path):
    tok = tiny.tokenizer()  # no chat template
    path = tiny.write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHATS[1]}])
    _, encoded = load_encoded(path, tok, PromptFormat(), seq2seq=False)
    (e,) = encoded.items
    assert not encoded.chat_template_used
    assert tok.decode(e.prompt_ids) == "user : dave needs a ticket assistant :"  # "User: ...\n\nAssistant:" in tiny words
    assert tok.decode([t for t in e.labels if t != IGNORE_INDEX]) == "okay dave </s>"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": []}, "row 1: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, r"row 1, turn 1: each turn needs a 'role' \(system, user, assistant\)"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "the first turn after any system turns must be a user turn"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "row 1 has no assistant turn"),
        ({"messages": CHATS[1] + [{"role": "user", "content": "and ?"}]}, r"turn 3 \(user\) comes after the last assistant turn"),
    ],
)
def test_bad_conversations_are_named_by_row_and_turn(tmp_path, row, message):
    path = tiny.write_jsonl(tmp_path / "c.jsonl", [row])
    with pytest.raises(ValueError, match=message):
        load_examples(path, PromptFormat())


def test_prompt_completion_and_instruction_rows_are_recognised(tmp_path):
    tok = tiny.tokenizer()
    pc = tiny.write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "alice buys a book ?", "completion": "yes ."}])
    examples, fmt, notes = load_examples(pc, PromptFormat())
    assert (fmt.layout, fmt.input_field, fmt.target_field, fmt.template) == ("prompt_completion", "prompt", "completion", "{input}")
    assert notes == [f"{pc}: prompt/completion rows (prompt -> completion)"]
    (e,) = load_encoded(pc, tok, PromptFormat(), seq2seq=False)[1].items
    assert tok.decode(e.prompt_ids) == "alice buys a book ?" and tok.decode(e.input_ids[e.prompt_length:]) == "yes . </s>"
    rows = [{"instruction": "summarize", "input": "bob sells a car", "output": "bob sells ."},
            {"instruction": "say thanks", "input": "", "output": "thanks"},
            {"instruction": "say yes", "output": "yes"}]
    inst = tiny.write_jsonl(tmp_path / "i.jsonl", rows)
    examples, fmt, notes = load_examples(inst, PromptFormat())
    assert fmt.layout == "instruction" and "instruction (+ input) -> output" in notes[0]
    assert [x.source for x in examples] == ["summarize\n\nbob sells a car", "say thanks", "say yes"]
    assert [x.target for x in examples] == ["bob sells .", "thanks", "yes"]
    # DialogSum fields still win, and named fields are the user's choice
    assert load_examples(tiny.write_jsonl(tmp_path / "d.jsonl", tiny.dialogue_rows(2)), PromptFormat())[1].layout == "fields"


def test_unknown_fields_list_the_layouts(tmp_path):
    path = tiny.write_jsonl(tmp_path / "q.jsonl", [{"question": "a ?", "reply": "b"}])
    with pytest.raises(ValueError, match=r"row 1 matches no layout .* fields are \['question', 'reply'\]. Known layouts, by "
                                         r"the fields they need: messages: messages; prompt_completion: prompt, completion; "
                                         r"instruction: instruction, output; fields: .* set --input-field and --target-field"):
        load_examples(path, PromptFormat())
    examples, fmt, _ = load_examples(path, PromptFormat(input_field="question", target_field="reply"))
    assert fmt.layout == "fields" and examples[0].target == "b"


def test_integer_and_boolean_class_labels_become_text(tmp_path):
    rows = [{"text": f"review {i}", "label": i % 3} for i in range(9)]
    path = tiny.write_jsonl(tmp_path / "l.jsonl", rows)
    examples, _, notes = load_examples(path, PromptFormat(input_field="text", target_field="label"))
    assert [x.target for x in examples] == [str(i % 3) for i in range(9)]
    assert "field 'label' holds class labels ['0', '1', '2']; learned and scored as the text labels" in notes[-1]
    flags = tiny.write_jsonl(tmp_path / "b.jsonl", [{"prompt": "is it ok ?", "completion": v} for v in (True, False, True)])
    assert [x.target for x in load_examples(flags, PromptFormat())[0]] == ["true", "false", "true"]


@pytest.mark.parametrize(
    "values, message",
    [
        ([0.5, 1.5, 2.0, 0.1], r"row 1, field 'answer' is a number \(0.5\); peftkit trains the model to write text. Store the target as text"),
        (list(range(10)), r"field 'answer' holds numbers \(10 different values in 10 rows, e.g. row 1: 0\): too many to be class labels"),
        (["yes", 1, "no", 0], r"field 'answer' mixes text and numbers \(row 2: 1\)"),
    ],
)
def test_numeric_answers_are_refused_with_the_fix(tmp_path, values, message):
    path = tiny.write_jsonl(tmp_path / "n.jsonl", [{"question": "how many ?", "answer": v} for v in values])
    with pytest.raises(ValueError, match=message):
        load_examples(path, PromptFormat(input_field="question", target_field="answer"))


def test_a_template_for_messages_is_refused(tmp_path):
    path = tiny.write_jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[1]}])
    with pytest.raises(ValueError, match="chat messages take no prompt template"):
        load_examples(path, PromptFormat(template="q: {input}"))


def test_hub_dataset_ids_are_read_through_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append((name, split)) or [{"prompt": "a", "completion": "b"}])
    examples, fmt, _ = load_examples("someone/qa-set:validation", PromptFormat())
    assert calls == [("someone/qa-set", "validation")] and fmt.layout == "prompt_completion" and examples[0].target == "b"
