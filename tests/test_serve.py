"""The OpenAI-compatible server, end to end: a live uvicorn server on 127.0.0.1 and the official
``openai`` client. Every generated text is compared with the offline output of the same adapter."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_utils import ADAPTERS, CONTEXT, LiveServer, Offline, build_server, make_model_dir, paused, slow_steps, wait_until

KEY = "test-key"
PROMPTS = ["hello world", "the cat sat on the mat and ran to the park", "summarize this text please", "red",
           "how are you today", "one two three four five six seven eight nine ten"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir, adapters = make_model_dir(root)
    return root, model_dir, adapters


@pytest.fixture(scope="module")
def live(files):
    root, model_dir, adapters = files
    app, engine = build_server(model_dir, adapters, api_key=KEY, adapter_root=str(root / "adapters"))
    with LiveServer(app, engine) as server:
        yield server


@pytest.fixture(scope="module")
def offline(files, live):
    _, model_dir, adapters = files
    return Offline(model_dir, adapters, sorted(live.engine.eos_ids))


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def name_of(model: str | None) -> str:
    return model or "tiny-llama"


def reference_name(model: str) -> str | None:
    return None if model == "tiny-llama" else model


MODELS = ["tiny-llama", *ADAPTERS]


def test_models_lists_the_base_and_every_adapter(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == set(MODELS)
    assert all(cards[a].model_dump()["parent"] == "tiny-llama" for a in ADAPTERS)


def test_adapters_really_differ_so_mixups_would_show(offline):
    outputs = {m: offline.completion(reference_name(m), PROMPTS[2], 10) for m in MODELS}
    assert len(set(outputs.values())) == len(MODELS), outputs


@pytest.mark.parametrize("model", MODELS)
def test_greedy_completion_equals_offline_output(client, offline, model):
    for prompt in PROMPTS[:3]:
        out = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        want_ids = offline.generate_ids(reference_name(model), offline.tokenizer(prompt).input_ids, 12)
        assert out.choices[0].text == offline.completion(reference_name(model), prompt, 12), (model, prompt)
        assert out.model == model and out.object == "text_completion"
        assert out.usage.prompt_tokens == len(offline.tokenizer(prompt).input_ids)
        assert out.usage.completion_tokens == len(want_ids)
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        assert out.choices[0].finish_reason == ("stop" if want_ids[-1] in offline.eos_ids else "length")


@pytest.mark.parametrize("model", MODELS)
def test_greedy_chat_equals_offline_output(client, offline, model):
    messages = [{"role": "system", "content": "good"}, {"role": "user", "content": "hello how are you"}]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == offline.chat(reference_name(model), messages, 10)


def test_32_concurrent_requests_over_3_adapters_and_base_share_forward_passes(live, client, offline):
    jobs = [(MODELS[i % 4], PROMPTS[i % len(PROMPTS)], 6 + i % 7) for i in range(32)]
    before = live.engine.stats()

    def ask(job):
        model, prompt, max_tokens = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)

    with ThreadPoolExecutor(32) as pool:
        with paused(live.engine):  # queue all 32 first, so they provably run in shared batches
            futures = [pool.submit(ask, job) for job in jobs]
            wait_until(lambda: live.engine.stats()["waiting"] == 32, what="32 queued requests")
        results = [f.result() for f in futures]

    for (model, prompt, max_tokens), out in zip(jobs, results):
        assert out.model == model
        assert out.choices[0].text == offline.completion(reference_name(model), prompt, max_tokens), (model, prompt)
    after = live.engine.stats()
    assert after["max_adapters_in_step"] == 4  # base + 3 adapters in one forward pass
    assert after["max_rows"] == 32
    assert after["prefills"] == before["prefills"] + 1  # all 32 prompts prefilled together
    assert after["running"] == 0 and after["waiting"] == 0


def test_streaming_yields_the_same_text(client, offline):
    for model in ("beta", "tiny-llama"):
        prompt = PROMPTS[1]
        whole = client.completions.create(model=model, prompt=prompt, max_tokens=14, temperature=0).choices[0].text
        chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=14, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole == offline.completion(reference_name(model), prompt, 14)
        assert len([c for c in chunks if c.choices]) > 1  # really streamed, not one block
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage.completion_tokens == len(offline.generate_ids(reference_name(model), offline.tokenizer(prompt).input_ids, 14))

    messages = [{"role": "user", "content": "red blue green"}]
    whole = client.chat.completions.create(model="gamma", messages=messages, max_tokens=9, temperature=0).choices[0].message.content
    chunks = list(client.chat.completions.create(model="gamma", messages=messages, max_tokens=9, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole == offline.chat("gamma", messages, 9)


def test_a_request_joining_a_running_batch_gets_its_offline_output(live, client, offline):
    """B arrives while A is mid-generation: B's prompt (different length, different adapter) is
    prefilled and its cache merged into A's running batch; both must match their offline outputs."""
    joins = live.engine.stats()["joins"]
    result = {}
    with slow_steps(live.engine), ThreadPoolExecutor(1) as pool:
        stream = client.completions.create(model="alpha", prompt=PROMPTS[5], max_tokens=60, temperature=0, stream=True)
        first = next(iter(stream))
        with paused(live.engine):
            future = pool.submit(client.completions.create, model="gamma", prompt=PROMPTS[3], max_tokens=20, temperature=0)
            wait_until(lambda: live.engine.stats()["waiting"] == 1, what="B queued")
            assert live.engine.stats()["running"] == 1  # A is still generating
        result["b"] = future.result().choices[0].text
        result["a"] = first.choices[0].text + "".join(c.choices[0].text for c in stream)
    assert live.engine.stats()["joins"] == joins + 1
    assert result["a"] == offline.completion("alpha", PROMPTS[5], 60)
    assert result["b"] == offline.completion("gamma", PROMPTS[3], 20)


def test_stop_strings_end_the_text_before_them(client):
    full = client.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    words = full.split()
    stop = " " + words[2]
    want = full[: full.index(stop)]
    out = client.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_seeded_sampling_is_reproducible_and_the_seed_matters(client):
    def sample(seed):
        return client.completions.create(model="gamma", prompt=PROMPTS[4], max_tokens=12, temperature=1.5, seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(1, 6)}) > 1


def test_n_choices_and_prompt_lists(client, offline):
    out = client.completions.create(model="alpha", prompt=[PROMPTS[0], PROMPTS[2]], max_tokens=5, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [offline.completion("alpha", p, 5) for p in (PROMPTS[0], PROMPTS[2])]
    out = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=8, temperature=1.0, seed=3, n=3)
    assert len(out.choices) == 3 and len({c.text for c in out.choices}) > 1


# --- errors -----------------------------------------------------------------------------------------
def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    return body["error"]


def test_malformed_input_is_400(live, client):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(live.url + "/v1/completions", content=b'{"model": "alpha", "prompt": ', headers=headers)
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "alpha"}, headers=headers)
    assert r.status_code == 400 and "messages" in error_of(r)["message"]
    for bad in (dict(temperature=5), dict(stop=["a", "b", "c", "d", "e"]), dict(max_tokens=0), dict(frequency_penalty=1.0)):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="alpha", prompt="hello", **bad)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):  # prompt fits, prompt + max_tokens does not
        client.completions.create(model="alpha", prompt="hello world", max_tokens=CONTEXT)


def test_missing_or_wrong_key_is_401_and_health_is_open(live):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        r = httpx.get(live.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="alpha", prompt="hello")
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-llama"


def test_unknown_model_and_route_are_404(live, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="delta", prompt="hello")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="delta", messages=[{"role": "user", "content": "hi"}])
    r = httpx.get(live.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and error_of(r)


def test_prompt_longer_than_the_model_allows_is_413(client):
    long_prompt = " ".join(["cat"] * (CONTEXT + 10))
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="alpha", prompt=long_prompt, max_tokens=1)
    assert info.value.status_code == 413 and info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": long_prompt}])
    assert info.value.status_code == 413


def test_full_queue_is_429(files):
    _, model_dir, adapters = files
    app, engine = build_server(model_dir, {"alpha": adapters["alpha"]}, max_batch_size=1, max_queue=1)
    with LiveServer(app, engine) as server, openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
        with ThreadPoolExecutor(1) as pool:
            with paused(engine):
                queued = pool.submit(c.completions.create, model="alpha", prompt="hello", max_tokens=3, temperature=0)
                wait_until(lambda: engine.stats()["waiting"] == 1, what="one queued request")
                with pytest.raises(openai.RateLimitError) as info:
                    c.completions.create(model="alpha", prompt="hello", max_tokens=3)
                assert info.value.body["code"] == "queue_full"
            assert queued.result().choices[0].finish_reason in ("stop", "length")


def test_a_client_that_disconnects_frees_its_slot(live, client):
    engine = live.engine
    aborted = engine.stats()["aborted"]
    # Streaming: the client reads one chunk and hangs up while the request is running.
    with slow_steps(engine):
        stream = client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=80, temperature=0, stream=True)
        next(iter(stream))
        engine.pause()
    try:
        assert engine.stats()["running"] == 1
        stream.close()
        wait_until(lambda: engine.stats()["running"] == 0, what="the slot to be freed")
    finally:
        engine.resume()
    assert engine.stats()["aborted"] == aborted + 1
    # Not streaming: the client gives up while its request waits for a slot.
    with paused(engine):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/completions", json={"model": "beta", "prompt": "hello", "max_tokens": 5},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx.Timeout(30, read=0.5))
        wait_until(lambda: engine.stats()["waiting"] == 0, what="the queued request to be dropped")
    assert engine.stats()["aborted"] == aborted + 2


# --- adapters at run time ---------------------------------------------------------------------------
def test_load_and_unload_adapters_at_run_time(live, client, files, offline):
    root, _, adapters = files
    post = lambda path, body: client.post(path, body=body, cast_to=httpx.Response)  # noqa: E731
    r = post("/load_lora_adapter", {"lora_name": "alpha-2", "lora_path": str(adapters["alpha"])})
    assert r.json()["status"] == "loaded"
    assert "alpha-2" in {m.id for m in client.models.list().data}
    out = client.completions.create(model="alpha-2", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert out.choices[0].text == offline.completion("alpha", PROMPTS[0], 8)
    with pytest.raises(openai.BadRequestError, match="already loaded"):
        post("/load_lora_adapter", {"lora_name": "alpha-2", "lora_path": "beta"})  # relative to the root

    r = post("/unload_lora_adapter", {"lora_name": "alpha-2"})
    assert r.json()["status"] == "unloaded"
    assert "alpha-2" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="alpha-2", prompt="hello")
    with pytest.raises(openai.NotFoundError):
        post("/unload_lora_adapter", {"lora_name": "alpha-2"})
    # The other adapters are untouched.
    out = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert out.choices[0].text == offline.completion("alpha", PROMPTS[0], 8)


def test_unloading_waits_for_the_adapters_running_requests(live, client, offline):
    client.post("/load_lora_adapter", body={"lora_name": "beta-2", "lora_path": "beta"}, cast_to=httpx.Response)
    with slow_steps(live.engine), ThreadPoolExecutor(1) as pool:
        stream = client.completions.create(model="beta-2", prompt=PROMPTS[1], max_tokens=40, temperature=0, stream=True)
        text = next(iter(stream)).choices[0].text
        with paused(live.engine):
            unloading = pool.submit(client.post, "/unload_lora_adapter", body={"lora_name": "beta-2"}, cast_to=httpx.Response)
            wait_until(lambda: "beta-2" not in httpx.get(live.url + "/health").json()["adapters"], what="beta-2 unroutable")
            with pytest.raises(openai.NotFoundError):  # new requests are refused at once ...
                client.completions.create(model="beta-2", prompt="hello")
            assert not unloading.done()  # ... but the running one keeps its adapter
        text += "".join(c.choices[0].text for c in stream)
        assert unloading.result().status_code == 200
    assert text == offline.completion("beta", PROMPTS[1], 40)


def test_adapter_paths_outside_the_root_are_refused(client, files, tmp_path):
    root, model_dir, adapters = files
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    link = root / "adapters" / "sneaky"
    os.symlink(outside, link)
    try:
        for path in (str(outside), "../../outside", str(link), "sneaky", str(model_dir)):
            with pytest.raises(openai.PermissionDeniedError):
                client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": path}, cast_to=httpx.Response)
    finally:
        link.unlink()
    with pytest.raises(openai.BadRequestError, match="adapter_config.json"):
        client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "missing"}, cast_to=httpx.Response)
    assert "x" not in {m.id for m in client.models.list().data}


def test_run_time_loading_is_off_without_an_adapter_root(files):
    _, model_dir, adapters = files
    app, engine = build_server(model_dir, {})
    with LiveServer(app, engine) as server, openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
        assert [m.id for m in c.models.list().data] == ["tiny-llama"]
        with pytest.raises(openai.PermissionDeniedError, match="adapter-root"):
            c.post("/load_lora_adapter", body={"lora_name": "a", "lora_path": str(adapters["alpha"])}, cast_to=httpx.Response)
        # The base model alone still serves (no PeftModel needed).
        assert c.completions.create(model="tiny-llama", prompt="hello", max_tokens=3, temperature=0).choices[0].text


def test_shutdown_finishes_in_flight_requests(files):
    _, model_dir, adapters = files
    app, engine = build_server(model_dir, {"gamma": adapters["gamma"]})
    offline = Offline(model_dir, {"gamma": adapters["gamma"]}, sorted(engine.eos_ids))
    server = LiveServer(app, engine).__enter__()
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    try:
        with slow_steps(engine):
            stream = c.completions.create(model="gamma", prompt=PROMPTS[5], max_tokens=50, temperature=0, stream=True)
            chunks = [next(iter(stream))]
            engine.pause()
        try:  # the request cannot finish before shutdown has begun
            assert engine.stats()["running"] == 1
            server.server.should_exit = True  # what SIGINT/SIGTERM do
            wait_until(lambda: not _accepts(server.port), what="the listening socket to close")
        finally:
            engine.resume()
        chunks += list(stream)
    finally:
        server.__exit__(None, None, None)
        c.close()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(ch.choices[0].text for ch in chunks) == offline.completion("gamma", PROMPTS[5], 50)
    assert engine.stats()["running"] == 0 and not engine._thread.is_alive()


def _accepts(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        return True
    except httpx.TransportError:
        return False
