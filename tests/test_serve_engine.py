"""The serving engine without HTTP: KV-cache bookkeeping, incremental text, sampling, and continuous
batching compared row by row with offline generation."""

from __future__ import annotations

import threading

import pytest
import torch
from serve_utils import ADAPTERS, Offline, build_server, make_model_dir, make_tokenizer, paused, wait_until
from transformers import DynamicCache

from peftkit.serve import batch
from peftkit.serve.engine import AdapterNotFound, QueueFull, Request, SamplingParams
from peftkit.serve.text import TextStream


# --- pure pieces ------------------------------------------------------------------------------------
def cache_of(keys: list[torch.Tensor]) -> DynamicCache:
    return DynamicCache([(k, k + 100) for k in keys])


def test_merge_pads_the_shorter_batch_on_the_left_and_select_trims_shared_padding():
    old = torch.arange(1 * 1 * 2 * 1, dtype=torch.float).view(1, 1, 2, 1) + 1  # 1 row, 2 columns
    new = torch.arange(2 * 1 * 4 * 1, dtype=torch.float).view(2, 1, 4, 1) + 10  # 2 rows, 4 columns
    cache, new_cache = cache_of([old, old]), cache_of([new, new])
    mask = batch.merge(cache, torch.ones(1, 2, dtype=torch.long), new_cache, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    assert mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]
    keys = cache.layers[1].keys
    assert keys.shape == (3, 1, 4, 1)
    assert keys[0, 0, :, 0].tolist() == [0, 0, 1, 2] and keys[2, 0, :, 0].tolist() == [14, 15, 16, 17]
    values = cache.layers[1].values
    assert values[0, 0, :, 0].tolist() == [0, 0, 101, 102] and torch.equal(values[1:], keys[1:] + 100)
    mask = batch.select(cache, mask, [1, 0])  # row 2 (no padding) leaves: one shared padding column goes
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[11, 12, 13], [0, 1, 2]]


def test_left_padding_and_positions():
    ids, mask = batch.left_padded([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_sampling_greedy_nucleus_and_seed():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    assert batch.sample(logits, 0.0, 1.0, None) == 1
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert all(batch.sample(logits, 1.0, 1e-6, g()) == 1 for _ in range(5))  # top_p ~ 0 keeps the argmax only
    draws = [batch.sample(logits, 1.0, 0.8, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) == {1, 2}  # p(1) ~ 0.63 < 0.8, so token 2 joins the nucleus; 0 and 3 never do
    assert [batch.sample(logits, 2.0, 1.0, torch.Generator().manual_seed(s)) for s in range(20)] == \
        [batch.sample(logits, 2.0, 1.0, torch.Generator().manual_seed(s)) for s in range(20)]


def test_text_stream_holds_back_possible_stop_strings_and_stops():
    tok = make_tokenizer()
    ids = tok("hello world how are you", add_special_tokens=False).input_ids
    stream = TextStream(tok, stop=("how are",))
    pieces = [stream.update(ids[: k + 1], final=False) for k in range(len(ids))]
    assert pieces[0] == ("hello", False) and pieces[1] == (" world", False)
    assert pieces[2] == (" ", False)  # "how" could be the start of "how are": held back
    assert pieces[3] == ("", True)  # the stop string ends the text
    assert stream.update(ids, final=True) == ("", True)
    assert stream.sent == "hello world "


def test_text_stream_waits_for_complete_characters():
    class Bytes:  # decodes ids as UTF-8 bytes, like byte-level BPE tokenizers
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    data = list("é!".encode())
    stream = TextStream(Bytes())
    assert stream.update(data[:1], final=False) == ("", False)
    assert stream.update(data[:2], final=False) == ("é", False)
    assert stream.update(data, final=True) == ("!", False)


# --- the engine ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir, adapters = make_model_dir(tmp_path_factory.mktemp("engine"))
    _, engine = build_server(model_dir, adapters, max_batch_size=6, max_queue=64)
    engine.start()
    yield engine, Offline(model_dir, adapters, sorted(engine.eos_ids)), make_tokenizer()
    engine.stop()


class Collector:
    def __init__(self):
        self.done = threading.Event()
        self.results: dict[int, list] = {}
        self._pending = 0
        self._lock = threading.Lock()

    def request(self, ids, adapter, **params) -> Request:
        with self._lock:
            key = len(self.results)
            self.results[key] = ["", None]
            self._pending += 1
        return Request(ids, adapter, SamplingParams(**params), lambda out: self._emit(key, out))

    def _emit(self, key, out):
        with self._lock:
            self.results[key][0] += out.text
            if out.finish_reason or out.error:
                self.results[key][1] = out.finish_reason or out.error
                self._pending -= 1
                if not self._pending:
                    self.done.set()


def test_waves_of_requests_joining_and_leaving_match_offline_generation(setup):
    """More requests than slots, of different lengths and adapters, arriving in three waves: rows join
    running batches, leave at different steps, and wait for free slots; every row equals offline."""
    engine, offline, tok = setup
    prompts = ["hello world", "the cat sat on the mat and ran to the park today", "red", "summarize this text please",
               "one two three four five six seven eight nine ten bird fish tree house", "how are you"]
    jobs = [(prompts[i % 6], [None, *ADAPTERS][i % 4], 3 + (5 * i) % 17) for i in range(14)]
    collector = Collector()
    requests = [collector.request(tok(p).input_ids, a or "__base__", max_tokens=m, temperature=0) for p, a, m in jobs]
    before = engine.stats()
    engine.submit(requests[:3])
    wait_until(lambda: engine.stats()["tokens"] > before["tokens"] + 3, what="the first wave to run")
    engine.submit(requests[3:9])
    wait_until(lambda: engine.stats()["tokens"] > before["tokens"] + 20, what="the second wave to run")
    engine.submit(requests[9:])
    assert collector.done.wait(120)
    for (prompt, adapter, max_tokens), (text, reason) in zip(jobs, collector.results.values()):
        assert text == offline.completion(adapter, prompt, max_tokens), (prompt, adapter)
        assert reason in ("stop", "length")
    after = engine.stats()
    assert after["joins"] > before["joins"] and after["max_rows"] == 6


def test_seeded_sampling_does_not_depend_on_batch_neighbours(setup):
    engine, _, tok = setup
    ids = tok("how are you today").input_ids
    alone = Collector()
    engine.submit([alone.request(ids, "beta", max_tokens=15, temperature=1.2, top_p=0.9, seed=11)])
    assert alone.done.wait(60)
    crowd = Collector()
    others = [crowd.request(tok(p).input_ids, a, max_tokens=15, temperature=1.0) for p, a in
              [("red", "alpha"), ("hello world", "__base__"), ("the cat", "gamma")]]
    engine.submit([others[0], crowd.request(ids, "beta", max_tokens=15, temperature=1.2, top_p=0.9, seed=11), *others[1:]])
    assert crowd.done.wait(60)
    assert crowd.results[3][0] == alone.results[0][0]  # keys follow creation order: the seeded one is 3


def test_submit_refuses_unknown_adapters_full_queues_and_overlong_requests(setup):
    engine, _, tok = setup
    ids = tok("hello").input_ids
    collector = Collector()
    with pytest.raises(AdapterNotFound):
        engine.submit([collector.request(ids, "nope", max_tokens=2)])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.submit([collector.request(ids, "alpha", max_tokens=engine.max_model_len)])
    with paused(engine):
        with pytest.raises(QueueFull):  # all or nothing: 65 requests never fit a queue of 64
            engine.submit([collector.request(ids, "alpha", max_tokens=2) for _ in range(65)])
        assert engine.stats()["waiting"] == 0


def test_abort_of_a_waiting_request(setup):
    engine, _, tok = setup
    collector = Collector()
    with paused(engine):
        request = collector.request(tok("hello").input_ids, "alpha", max_tokens=5)
        engine.submit([request])
        engine.abort([request])
        assert collector.done.wait(30)
    assert collector.results[0] == ["", "abort"] and request.generated == []


def poisoned(collector: Collector, ids: list[int], adapter: str, **fields) -> Request:
    """A request whose sampling settings slipped past validation (the HTTP side refuses these)."""
    request = collector.request(ids, adapter, max_tokens=12, temperature=1.0)
    for name, value in fields.items():
        object.__setattr__(request.params, name, value)
    return request


def test_a_request_that_fails_ends_alone_and_its_batch_neighbours_get_their_solo_output(setup):
    """Requests that fail inside the engine (a temperature that overflows, a seed torch refuses, a client
    callback that raises), in the same prefill and decoding steps as innocent ones: each failing request
    ends with its own error; the innocent ones equal offline generation of each alone."""
    engine, offline, tok = setup
    innocent = [("hello world", "alpha"), ("the cat sat on the mat", None), ("how are you", "gamma")]
    collector = Collector()
    requests = [collector.request(tok(p).input_ids, a or "__base__", max_tokens=12, temperature=0) for p, a in innocent]
    ids = tok("red").input_ids
    requests.insert(1, poisoned(collector, ids, "beta", temperature=1e-300))
    requests.insert(3, poisoned(collector, ids, "alpha", seed=2**70))

    def raising(out):
        raise RuntimeError("the client's callback failed")

    requests.append(Request(ids, "beta", SamplingParams(max_tokens=12, temperature=0), raising))
    errors = engine.stats()["errors"]
    with paused(engine):  # all of them in one prefill
        engine.submit(requests)
    assert collector.done.wait(60)
    results = list(collector.results.values())  # in creation order: the innocent ones, then the poisoned ones
    for (prompt, adapter), (text, reason) in zip(innocent, results[:3]):
        assert reason in ("stop", "length"), (prompt, reason)
        assert text == offline.completion(adapter, prompt, 12), (prompt, adapter)
    for text, reason in results[3:]:
        assert reason not in ("stop", "length", "abort") and text == "", reason  # an error message
    assert engine.stats()["errors"] == errors + 3 and engine.stats()["running"] == 0
    # ... and the engine keeps serving.
    later = Collector()
    engine.submit([later.request(tok("hello world").input_ids, "alpha", max_tokens=12, temperature=0)])
    assert later.done.wait(60) and later.results[0][0] == offline.completion("alpha", "hello world", 12)


def test_sampling_params_refuse_what_the_sampler_cannot_use():
    for bad in (dict(temperature=1e-300), dict(temperature=-1), dict(seed=2**64), dict(seed=-(2**63) - 1),
                dict(top_p=0), dict(max_tokens=0), dict(stop=(1,))):
        with pytest.raises(ValueError):
            SamplingParams(**{"max_tokens": 4, **bad})
    logits = torch.tensor([3.0, 1.0, 2.0])
    assert batch.sample(logits, 0.01, 1.0, torch.Generator().manual_seed(0)) == 0  # tiny temperature: no NaN


def test_the_engine_wraps_its_base_once_and_keeps_that_model_through_loads_and_unloads(tmp_path):
    """A server started without adapters holds a PeftModel from the start (no adapter yet); loading and
    unloading adapters changes what it holds, never which object (or type) ``engine.model`` is, and base
    rows served before, between and after give the base model's own output."""
    from peftkit import PeftModel

    model_dir, adapters = make_model_dir(tmp_path)
    _, engine = build_server(model_dir, {}, max_batch_size=4, max_queue=16)
    offline, tok = Offline(model_dir, adapters, sorted(engine.eos_ids)), make_tokenizer()
    model = engine.model
    assert isinstance(model, PeftModel) and model.peft_config == {}
    engine.start()
    try:
        def run(adapter_names):
            collector = Collector()
            requests = [collector.request(tok("the cat sat").input_ids, a, max_tokens=6, temperature=0) for a in adapter_names]
            engine.submit(requests)
            assert collector.done.wait(120)
            return [text for text, _ in collector.results.values()]

        base_text = offline.completion(None, "the cat sat", 6)
        assert run(["__base__"]) == [base_text]
        name = ADAPTERS[0]
        engine.load_adapter(name, str(adapters[name])).result(timeout=60)
        assert engine.model is model and list(model.peft_config) == [name]
        assert run(["__base__", name]) == [base_text, offline.completion(name, "the cat sat", 6)]
        engine.unload_adapter(name).result(timeout=60)
        assert engine.model is model and model.peft_config == {}
        assert run(["__base__"]) == [base_text]
    finally:
        engine.stop()
