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
    monkeypatch.setattr(hub, "gguf_path", lambda entry: tmp_path / "model.gguf")
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


def test_load_model_picks_the_model_class(tmp_path):
    model, tok = hub.load_model(tiny.model_dir(tmp_path, "t5"))
    assert type(model).__name__ == "T5ForConditionalGeneration" and hub.is_seq2seq(model.config)
    model, tok = hub.load_model(tiny.model_dir(tmp_path, "gpt2"))
    assert type(model).__name__ == "GPT2LMHeadModel" and not hub.is_seq2seq(model.config)


def test_models_commands(cache, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert hub.DEFAULT_MODEL in out and "not converted yet" in out
    assert main(["models", "path", hub.DEFAULT_MODEL]) == 0
    assert Path(capsys.readouterr().out.strip()) == hub.cached_path(hub.DEFAULT_MODEL)
    assert main(["models", "list"]) == 0
    assert "cached at" in capsys.readouterr().out
    assert main(["models", "path", "gpt-17"]) == 2
    assert "'gpt-17' is not in the catalogue; known: smollm2-135m-instruct" in capsys.readouterr().err
