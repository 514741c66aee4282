"""The serving engine's static (preallocated, slot) KV cache, and its prepacked base weights, against the
dynamic cache over plain weights: the same greedy token ids, step by step, for mixed-adapter batches whose
rows join, leave and refill slots."""

from __future__ import annotations

import pytest
import torch
from serve_utils import ADAPTERS, make_model_dir, make_tokenizer
from transformers import DynamicCache

from peftkit.serve.engine import Engine, Request, SamplingParams
from peftkit.serve.kv_cache import StaticRunningCache, static_refusal
from peftkit.serve.app import load_base


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("kv"))


def engine_for(model_dir, adapters, kv_cache: str, max_batch_size: int, prepack_weights: bool = False) -> Engine:
    model, tokenizer = load_base(str(model_dir), "cpu", "float32")
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, kv_cache=kv_cache, prepack_weights=prepack_weights)
    for name, path in adapters.items():
        engine.load_adapter(name, str(path)).result()
    return engine


def run_schedule(engine: Engine, waves: dict[int, list[tuple[list[int], str, int]]], abort: dict[int, int]):
    """Drive the engine's worker loop by hand (no thread): wave ``k`` is submitted before step ``k``, request
    ``abort[k]`` is aborted before step ``k``. Returns each request's generated ids and finish reason, and the
    number of rows of every decoding step."""
    requests, reasons, rows_per_step = [], {}, []
    for step in range(200):
        for prompt, adapter, max_tokens in waves.get(step, []):
            i = len(requests)
            requests.append(Request(prompt, adapter, SamplingParams(max_tokens=max_tokens, temperature=0),
                                    lambda out, i=i: out.finish_reason and reasons.__setitem__(i, out.finish_reason)))
            engine.submit([requests[-1]])
        if step in abort:
            engine.abort([requests[abort[step]]])
        engine._run_commands()
        engine._drop_aborted()
        if not (engine._rows or engine._waiting) and step > max(waves):
            break
        with torch.inference_mode():
            engine._step()
        rows_per_step.append(len(engine._rows))
    return [(r.generated, reasons.get(i)) for i, r in enumerate(requests)], rows_per_step


def test_static_cache_gives_the_dynamic_caches_tokens_as_rows_join_leave_and_refill_slots(model_dir):
    """Three waves of requests over the base model and three adapters, prompts of 2 to 16 tokens, 1 to 13 new
    tokens, more requests than slots (4), one aborted mid-way: each request's greedy token ids are the
    same with both caches, and rows really did run together, leave and get replaced."""
    path, adapters = model_dir
    tok = make_tokenizer()
    prompts = ["hello world", "the cat sat on the mat and ran to the park today", "red",
               "summarize this text please", "one two three four five six seven eight nine ten bird fish tree house",
               "how are you"]
    names = ["__base__", *ADAPTERS]
    jobs = [(tok(prompts[i % 6]).input_ids, names[(i * 3) % 4], 1 + (5 * i) % 13) for i in range(13)]
    waves = {0: jobs[:3], 2: jobs[3:8], 9: jobs[8:]}
    abort = {5: 4}
    results = {}
    for kind in ("dynamic", "static", "static+prepacked"):
        engine = engine_for(path, adapters, kind.split("+")[0], max_batch_size=4, prepack_weights="prepacked" in kind)
        assert engine.prepacked_layers == (15 if "prepacked" in kind else 0)  # 2 x 7 projections + the output head
        results[kind] = run_schedule(engine, waves, abort)
        assert engine.counters["joins"] >= 2 and engine.counters["max_adapters_in_step"] >= 3
    (dynamic, dynamic_rows), (static, static_rows) = results["dynamic"], results["static"]
    assert static == dynamic
    assert static_rows == dynamic_rows and max(static_rows) == 4
    assert results["static+prepacked"] == results["static"]  # the base's linear layers packed, adapters separate
    assert dynamic[4][1] == "abort" and all(reason in ("stop", "length") for i, (_, reason) in enumerate(dynamic) if i != 4)
    assert len({len(ids) for ids, _ in dynamic}) >= 5  # rows finished at many different steps


def test_a_slot_keeps_no_trace_of_its_previous_occupant():
    """Slots left by finished rows are refilled by the last rows (one row copied per hole); every column a
    row does not own is zero, so a masked column adds exactly nothing to attention."""
    cache = StaticRunningCache()

    def prefill(lengths, value):
        width = max(lengths)
        keys = torch.zeros(len(lengths), 1, width, 2)
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        for i, n in enumerate(lengths):
            keys[i, :, width - n:] = value + i
            mask[i, width - n:] = 1
        return DynamicCache([(keys, keys + 0.5)]), mask

    cache.join(*prefill([5, 2, 3], 10.0))
    cache.step()
    assert cache.lengths == [6, 3, 4]
    order = cache.keep([2, 1])  # row 0 leaves: the last row moves into its slot
    assert order == [2, 1] and cache.lengths == [4, 3]
    cache.join(*prefill([1], 20.0))
    layer = cache.layers[0]
    for slot, (length, value) in enumerate(zip(cache.lengths, [12.0, 11.0, 20.0])):
        assert torch.all(layer.keys[slot, :, : length - (slot < 2)] == value)  # the prompt (the step's column is unset)
        assert torch.all(layer.keys[slot, :, length:] == 0) and torch.all(layer.values[slot, :, length:] == 0)


def test_models_with_sliding_window_layers_keep_the_dynamic_cache(model_dir):
    from transformers import LlamaConfig, MistralConfig

    assert static_refusal(LlamaConfig()) is None
    assert "sliding" in static_refusal(MistralConfig(sliding_window=64))
    path, _ = model_dir
    model, tokenizer = load_base(str(path), "cpu", "float32")
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="sliding_attention.*kv_cache='dynamic'"):
        Engine(model, tokenizer, kv_cache="static")
    assert Engine(model, tokenizer).kv_cache == "dynamic"  # the default, auto, falls back
    with pytest.raises(ValueError, match="kv_cache must be auto, static or dynamic"):
        Engine(model, tokenizer, kv_cache="paged")
