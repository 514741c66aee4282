"""The server under hostile input: adapters it must refuse, requests built to fail, clients that hang up,
paths that try to leave the adapter root. After each, the base model is bit for bit what it was and
innocent requests get the output they get alone (docs/RELIABILITY.md, "Server")."""

from __future__ import annotations

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_utils import (
    LiveServer,
    Offline,
    build_server,
    make_model_dir,
    make_unservable_adapters,
    model_state,
    paused,
    slow_steps,
    wait_until,
)

PROMPTS = ["hello world", "the cat sat on the mat and ran to the park", "summarize this text please", "red"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model_dir, adapters = make_model_dir(root)
    bad = make_unservable_adapters(model_dir, root / "adapters", adapters["alpha"])
    return root, model_dir, adapters, bad


@pytest.fixture(scope="module")
def live(files):
    """No adapter at start (the first load wraps the bare model), a small queue (for the ``n`` limit)."""
    root, model_dir, _, _ = files
    app, engine = build_server(model_dir, {}, adapter_root=str(root / "adapters"), max_queue=8, max_batch_size=8)
    with LiveServer(app, engine) as server:
        yield server


@pytest.fixture(scope="module")
def offline(files, live):
    _, model_dir, adapters, _ = files
    return Offline(model_dir, adapters, sorted(live.engine.eos_ids))


def post(live, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(live.url + path, json=body, timeout=timeout)


def complete(live, model: str, prompt: str, max_tokens: int = 10, **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return post(live, "/v1/completions", body)


def ensure_loaded(live, name: str) -> None:
    if name not in live.engine.adapters:
        assert post(live, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": name}).status_code == 200


# --- transactional adapter loads ----------------------------------------------------------------------
def test_every_refused_load_is_a_4xx_that_says_why_and_leaves_the_model_bit_for_bit(live, files, offline):
    """Each kind of unservable or broken adapter, first onto the bare model (the load would wrap it),
    then onto a model that already serves an adapter. Parameters, buffers, requires_grad, modules and
    training flags are hashed before and after every refusal."""
    _, _, _, bad = files
    engine = live.engine
    for round_ in ("bare model", "model with an adapter"):
        if round_ == "model with an adapter":
            ensure_loaded(live, "alpha")
        with paused(engine):
            before = model_state(engine.model)
        for kind, (path, must_say) in bad.items():
            r = post(live, "/v1/load_lora_adapter", {"lora_name": kind, "lora_path": path.name})
            assert r.status_code in (400, 422), (round_, kind, r.status_code, r.text)
            message = r.json()["error"]["message"]
            assert must_say in message, (round_, kind, message)
            with paused(engine):
                assert model_state(engine.model) == before, (round_, kind)
            assert kind not in engine.adapters
    # Afterwards the server is as good as new: base and adapter outputs equal offline, names are free.
    for model, ref in (("tiny-llama", None), ("alpha", "alpha")):
        assert complete(live, model, PROMPTS[2]).json()["choices"][0]["text"] == offline.completion(ref, PROMPTS[2], 10)
    assert post(live, "/v1/load_lora_adapter", {"lora_name": "full", "lora_path": "beta"}).status_code == 200
    assert complete(live, "full", PROMPTS[0]).json()["choices"][0]["text"] == offline.completion("beta", PROMPTS[0], 10)
    assert post(live, "/v1/unload_lora_adapter", {"lora_name": "full"}).status_code == 200


def test_an_unservable_start_up_adapter_stops_the_server_before_it_serves(files):
    _, model_dir, _, bad = files
    with pytest.raises(ValueError, match="bias='all'"):  # the command line prints it as one line
        build_server(model_dir, {"b": bad["lora-bias-all"][0]})
    with pytest.raises(ValueError, match="q_proj"):
        build_server(model_dir, {"b": bad["bad-target-regex"][0]})


def test_files_that_link_outside_the_root_are_refused(live, files, tmp_path):
    """A folder inside the root is not enough: each file the loader reads must resolve inside it."""
    root, _, adapters, _ = files
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (outside / name).write_bytes((adapters["gamma"] / name).read_bytes())
    for linked in ("adapter_config.json", "adapter_model.safetensors"):
        folder = root / "adapters" / f"links-{linked.split('.')[0]}"
        folder.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if name == linked:
                os.symlink(outside / name, folder / name)
            else:
                (folder / name).write_bytes((outside / name).read_bytes())
        r = post(live, "/v1/load_lora_adapter", {"lora_name": "sneaky", "lora_path": folder.name})
        assert r.status_code == 403, (linked, r.text)
        assert "outside the adapter root" in r.json()["error"]["message"]
        assert "sneaky" not in live.engine.adapters
    # A link that stays inside the root is fine.
    inside = root / "adapters" / "links-inside"
    inside.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(adapters["gamma"] / name, inside / name)
    assert post(live, "/v1/load_lora_adapter", {"lora_name": "inside", "lora_path": "links-inside"}).status_code == 200
    assert post(live, "/v1/unload_lora_adapter", {"lora_name": "inside"}).status_code == 200


@pytest.mark.parametrize("lora_path", ["alpha\x00", "\x00", "a" * 5000, "alpha/" + "b" * 300])
def test_unusable_lora_paths_are_400(live, lora_path):
    r = post(live, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": lora_path})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "lora_path"


# --- requests: validated at the door, isolated in the engine ------------------------------------------
HOSTILE = [  # (body fields, the field the 400 must name)
    ({"seed": 2**64}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"temperature": 1e-300}, "temperature"),
    ({"temperature": 1e-5}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),  # more than this server's queue (8) can ever hold: 400, not 429
    ({"n": 10**6}, "n"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": [10**30]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": ["red"] * 9}, "n"),  # 9 prompts x n=1: the same queue limit
    ({"logit_bias": {"5": 100}}, "logit_bias"),
    ({"presence_penalty": 1.0}, "presence_penalty"),
]


def test_hostile_sampling_fields_are_400s_naming_the_field_and_innocent_neighbours_are_unharmed(live, offline):
    ensure_loaded(live, "alpha")
    ensure_loaded(live, "beta")
    innocent = [("tiny-llama", PROMPTS[0]), ("alpha", PROMPTS[1]), ("beta", PROMPTS[2]), ("alpha", PROMPTS[3])]
    expected = [offline.completion(None if m == "tiny-llama" else m, p, 16) for m, p in innocent]
    with slow_steps(live.engine, 0.01), ThreadPoolExecutor(len(innocent) + len(HOSTILE)) as pool:
        running = [pool.submit(complete, live, m, p, 16) for m, p in innocent]
        hostile = [pool.submit(post, live, "/v1/completions", {"model": "alpha", "prompt": "hello world", "max_tokens": 10,
                                                               "temperature": 1.0, **fields}) for fields, _ in HOSTILE]
        for (fields, param), future in zip(HOSTILE, hostile):
            r = future.result()
            assert r.status_code == 400, (fields, r.status_code, r.text)
            assert r.json()["error"]["param"] == param, (fields, r.json())
        got = [f.result() for f in running]
    assert [r.status_code for r in got] == [200] * len(innocent)
    assert [r.json()["choices"][0]["text"] for r in got] == expected
    # NaN is not JSON, but Python's parser (and so the server's) reads it: still a 400 naming the field.
    raw = '{"model": "alpha", "prompt": "red", "temperature": NaN}'
    r = httpx.post(live.url + "/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_seeds_anywhere_in_64_bits_work_and_n_stays_repeatable(live):
    ensure_loaded(live, "alpha")
    for seed in (2**64 - 1, -(2**63), 0):
        r1 = complete(live, "alpha", "hello world", 8, temperature=1.0, seed=seed, n=3).json()
        r2 = complete(live, "alpha", "hello world", 8, temperature=1.0, seed=seed, n=3).json()
        assert [c["text"] for c in r1["choices"]] == [c["text"] for c in r2["choices"]]


# --- clients that hang up --------------------------------------------------------------------------------
def test_a_non_streaming_client_that_hangs_up_frees_its_slot_at_the_next_step(live, offline):
    ensure_loaded(live, "gamma")
    engine = live.engine
    prompt, max_tokens = PROMPTS[1], 80
    ids = offline.tokenizer(prompt).input_ids
    # Without the hang-up the request would run all 80 steps (no end-of-text token before that).
    assert len(offline.generate_ids("gamma", ids, max_tokens)) == max_tokens
    body = json.dumps({"model": "gamma", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    before = engine.stats()
    with slow_steps(engine, 0.03):
        conn = socket.create_connection(("127.0.0.1", live.port))
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: engine.stats()["running"] == 1, what="the request to run")
        wait_until(lambda: engine.stats()["tokens"] >= before["tokens"] + 3, what="a few tokens")
        conn.close()
        hung_up_at = engine.stats()["steps"]
        wait_until(lambda: engine.stats()["running"] == 0, what="the slot to be freed")
    after = engine.stats()
    assert after["aborted"] == before["aborted"] + 1
    assert after["finished"] == before["finished"]  # it did not run to its end
    # "Next step" once the server has seen the hang-up, which takes uvicorn an event-loop turn or two; on a
    # loaded machine that can be several steps, still far fewer than the ~75 the request had left.
    assert after["steps"] - hung_up_at <= 30, after["steps"] - hung_up_at
