"""Soft prompts (prompt tuning, prefix tuning, P-tuning): what the model receives, generation, init
from text, folding the reparameterization networks, and the errors users meet."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, build, inputs, output
from transformers import DynamicCache, EncoderDecoderCache

from peftkit import LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from peftkit.methods.prompt_tuning import from_peft_fields, to_peft_fields
from peftkit.registry import get_preset

P = 3
SOFT = {
    "prompt_tuning": lambda: PromptTuningConfig(num_virtual_tokens=P),
    "prefix_tuning": lambda: PrefixTuningConfig(num_virtual_tokens=P),
    "prefix_tuning_mlp": lambda: PrefixTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16),
    "p_tuning": lambda: PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16),
}
LMS = ["gpt2", "llama", "t5", "bart"]


def soft(method: str, arch: str, seed: int = 0) -> PeftModel:
    model = get_peft_model(build(arch, seed), SOFT[method]())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking virtual tokens, so they visibly change outputs
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def received(model: PeftModel, **batch) -> dict:
    """The keyword inputs the base model's forward receives from the PeftModel."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    handle = model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen


def cache_of(seen: dict):
    return seen.get("cache", seen.get("past_key_values"))


# --- what the model receives -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_causal_prompt_extends_embeddings_mask_and_labels(method):
    model = soft(method, "gpt2")
    batch = inputs("gpt2")
    batch["attention_mask"][0, :2] = 0  # a left-padded row keeps its zeros after the virtual tokens
    seen = received(model, **batch)
    assert "input_ids" not in seen or seen["input_ids"] is None
    embeds = seen["inputs_embeds"]
    prompts = model._tuners["default"].tokens()[:P]
    assert embeds.shape == (2, P + 8, 32)
    torch.testing.assert_close(embeds[:, :P], prompts.expand(2, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(embeds[:, P:], model.base_model.get_input_embeddings()(batch["input_ids"]), rtol=0, atol=0)
    assert seen["attention_mask"].tolist() == [[1] * P + row for row in batch["attention_mask"].tolist()]
    assert seen["labels"].tolist() == [[-100] * P + row for row in batch["labels"].tolist()]
    out = model(**batch)
    assert out.logits.shape == (2, P + 8, 128)
    # The loss ignores the virtual positions: it equals the base model's loss on the same embeddings.
    with torch.no_grad():
        reference = model.base_model(inputs_embeds=embeds, attention_mask=seen["attention_mask"], labels=seen["labels"]).loss
    torch.testing.assert_close(out.loss, reference)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_prompt_goes_to_the_encoder_only(arch):
    model = soft("prompt_tuning", arch)
    batch = inputs(arch)
    seen = received(model, **batch)
    assert seen["inputs_embeds"].shape == (2, P + 8, 32)
    assert seen["attention_mask"].shape == (2, P + 8) and seen["attention_mask"][:, :P].eq(1).all()
    assert torch.equal(seen["labels"], batch["labels"])  # decoder side unchanged
    assert model(**batch).logits.shape == (2, 5, 128)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_prefix_is_a_cache_of_virtual_keys_and_values(arch):
    model = soft("prefix_tuning", arch)
    batch = inputs(arch)
    seen = received(model, **batch)
    cache = cache_of(seen)
    assert isinstance(cache, DynamicCache)
    assert seen["attention_mask"].shape == (2, P + 8)
    assert torch.equal(seen["labels"], batch["labels"])
    out = model(**batch)
    assert out.logits.shape == (2, 8, 128)
    # Every layer's cache holds the prefix followed by the 8 real tokens.
    kv_heads = model.base_model.config.num_key_value_heads if arch == "llama" else 4
    assert len(cache.layers) == 2 and tuple(cache.layers[0].keys.shape) == (2, kv_heads, P + 8, 8)
    prefix = model._tuners["default"].tokens().view(P, 4, kv_heads, 8)  # (P, 2 layers x key/value, heads, head_dim)
    torch.testing.assert_close(cache.layers[1].values[0, :, :P], prefix[:, 3].transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_prefix_goes_to_decoder_self_attention(arch):
    model = soft("prefix_tuning", arch)
    batch = inputs(arch)
    batch["decoder_input_ids"] = batch.pop("labels")
    batch["decoder_attention_mask"] = torch.ones_like(batch["decoder_input_ids"])
    seen = received(model, **batch)
    cache = cache_of(seen)
    assert isinstance(cache, EncoderDecoderCache)
    assert cache.self_attention_cache.get_seq_length() == P + 5
    assert seen["decoder_attention_mask"].shape == (2, P + 5)
    assert torch.equal(seen["attention_mask"], batch["attention_mask"])  # the encoder sees no prefix


def test_prefix_changes_outputs_and_disable_adapter_gives_the_base(lm_arch):
    batch = inputs(lm_arch)
    reference = output(build(lm_arch), batch)
    for method in SOFT:
        model = soft(method, lm_arch)
        logits = output(model, batch)
        assert not torch.allclose(logits[:, -reference.shape[1]:], reference, atol=1e-4), method
        with model.disable_adapter():
            torch.testing.assert_close(output(model, batch), reference, rtol=0, atol=0)


def test_positional_input_ids_get_the_prompt_too():
    model = soft("prompt_tuning", "gpt2")
    ids = inputs("gpt2")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(input_ids=ids).logits)
        assert model(ids).logits.shape[1] == P + 8
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), model.generate(input_ids=ids, max_new_tokens=3, do_sample=False))


def test_a_decoding_step_with_a_filled_cache_only_extends_the_mask():
    model = soft("prefix_tuning", "gpt2")
    batch = inputs("gpt2")
    with torch.no_grad():
        first = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        step_ids = first.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.ones(2, 9, dtype=torch.long)
        step = model(input_ids=step_ids, attention_mask=mask, **{model._tuners["default"].cache_key(): cache})
        full = model(input_ids=torch.cat([batch["input_ids"], step_ids], 1), attention_mask=mask)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)


# --- generate --------------------------------------------------------------------------------------------
def greedy(model: PeftModel, arch: str, batch: dict, steps: int, min_new_tokens: int = 0) -> torch.Tensor:
    """Greedy decoding by full forward passes (no cache): the ground truth generate must match.
    The first ``min_new_tokens`` steps may not pick EOS (``generate(min_new_tokens=...)``)."""
    config = model.base_model.generation_config
    eos, pad = config.eos_token_id, config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    ids, mask = batch["input_ids"], batch["attention_mask"]
    seq = ids if not ARCHS[arch].seq2seq else torch.full((ids.shape[0], 1), model.base_model.config.decoder_start_token_id)
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            if ARCHS[arch].seq2seq:
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=seq).logits
            else:
                logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            logits = logits[:, -1]
            if seq.shape[1] - (0 if ARCHS[arch].seq2seq else ids.shape[1]) < min_new_tokens + (1 if ARCHS[arch].seq2seq else 0):
                logits[:, eos] = -float("inf")
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == eos
            if done.all():
                break
    return seq


@pytest.mark.parametrize("method", list(SOFT))
@pytest.mark.parametrize("arch", LMS)
def test_generate_equals_greedy_decoding_by_forward(method, arch):
    model = soft(method, arch)
    batch = inputs(arch)
    # min_new_tokens: the tiny random BART would otherwise stop at once.
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5,
                         min_new_tokens=3, do_sample=False)
    expected = greedy(model, arch, batch, 5, min_new_tokens=3)
    assert out.shape[1] >= (4 if ARCHS[arch].seq2seq else 11)
    assert out.tolist() == expected.tolist()
    if not ARCHS[arch].seq2seq:
        assert torch.equal(out[:, :8], batch["input_ids"])  # the prompt, then the new tokens


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_generate_with_beams_and_several_sequences(arch):
    model = soft("prefix_tuning", arch)
    batch = inputs(arch)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3,
                         num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape[0] == 4


# --- initialisation from text ----------------------------------------------------------------------------
def tiny_tokenizer(directory) -> str:
    """A lower-casing word-level tokenizer saved in ``directory`` (ids < the tiny models' 128 tokens)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "summarize the following conversation .".split()
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: 10 + i for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)
    return str(directory)


TEXT = "Summarize the following conversation."
TEXT_IDS = [10, 11, 12, 13, 14]


@pytest.mark.parametrize("n", [3, 12])
def test_init_from_text_copies_token_embeddings_cut_or_repeated(tmp_path, n):
    base = build("gpt2")
    config = PromptTuningConfig(num_virtual_tokens=n, init_text=TEXT, tokenizer_name_or_path=tiny_tokenizer(tmp_path / "tok"))
    model = get_peft_model(base, config)
    ids = (TEXT_IDS * 3)[:n]
    expected = base.get_input_embeddings().weight[ids]
    assert torch.equal(model._tuners["default"].tokens(), expected)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["prompt_tuning_init"] == "TEXT" and saved["prompt_tuning_init_text"] == TEXT
    assert saved["tokenizer_name_or_path"] == str(tmp_path / "tok") and "init_text" not in saved


def test_init_text_uses_the_base_models_tokenizer_by_default(tmp_path):
    base = build("llama")
    base.config._name_or_path = tiny_tokenizer(tmp_path)  # where a hub model keeps its tokenizer
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=5, init_text=TEXT))
    assert torch.equal(model._tuners["default"].tokens(), base.get_input_embeddings().weight[TEXT_IDS])


def test_init_text_without_a_tokenizer_is_refused():
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        get_peft_model(build("gpt2"), PromptTuningConfig(num_virtual_tokens=3, init_text=TEXT))


def test_sample_vocab_init_uses_vocabulary_embeddings():
    base = build("t5")
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"))
    vocab = base.get_input_embeddings().weight
    for row in model._tuners["default"].tokens():
        assert (vocab == row).all(-1).any()


def test_init_text_key_map_round_trips():
    ours = {"init_text": TEXT, "num_virtual_tokens": 4}
    theirs = to_peft_fields(ours)
    assert theirs == {"prompt_tuning_init_text": TEXT, "num_virtual_tokens": 4}
    assert from_peft_fields(theirs) == ours
    with pytest.raises(ValueError, match="not both"):
        from_peft_fields({"init_text": "a", "prompt_tuning_init_text": "b"})
    config = PromptTuningConfig.from_dict(PromptTuningConfig(init_text=TEXT, tokenizer_name_or_path="x").to_dict())
    assert config.init_text == TEXT and config.init == "TEXT"


# --- folding the reparameterization networks ------------------------------------------------------------
@pytest.mark.parametrize("method", ["prefix_tuning_mlp", "p_tuning"])
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_trained_mlp_is_folded_for_saving_and_inference(method, arch, tmp_path):
    model = soft(method, arch)
    batch = inputs(arch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    expected = output(model, batch)
    head = "transform" if method.startswith("prefix") else "mlp_head"
    trained_names = [n for n, _ in model._tuners["default"].named_parameters()]
    assert any(f".{head}." in n for n in trained_names)

    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert list(tensors) == ["prompt_embeddings"]  # the MLP is not saved
    loaded = PeftModel.from_pretrained(build(arch), tmp_path)
    names = [n for n, _ in loaded._tuners["default"].named_parameters()]
    assert names == ["prompt_encoder.default.embedding.weight"]
    assert torch.equal(output(loaded, batch), expected)
    assert torch.equal(loaded.generate(input_ids=batch["input_ids"], max_new_tokens=3, do_sample=False),
                       model.generate(input_ids=batch["input_ids"], max_new_tokens=3, do_sample=False))
    with pytest.raises(ValueError, match="folded"):
        PeftModel.from_pretrained(build(arch), tmp_path, is_trainable=True)


def test_prompt_tuning_resumes_training_from_a_file(tmp_path):
    model = soft("prompt_tuning", "bart")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("bart"), tmp_path, is_trainable=True)
    assert [p.requires_grad for _, p in loaded._tuners["default"].named_parameters()] == [True]
    assert torch.equal(output(loaded, inputs("bart")), output(model, inputs("bart")))


# --- adapters on one model --------------------------------------------------------------------------------
def test_soft_prompt_and_lora_switch_and_delete_cleanly():
    batch = inputs("llama")
    reference = output(build("llama"), batch)
    model = soft("prompt_tuning", "llama")
    prompted = output(model, batch)
    model.add_adapter("lora", LoraConfig(r=2, init_lora_weights=False))
    model.set_adapter("lora")
    lora = output(model, batch)
    assert lora.shape == reference.shape and not torch.allclose(lora, reference)
    model.set_adapter("default")
    assert torch.equal(output(model, batch), prompted)
    with pytest.raises(ValueError, match="cannot share a batch"):
        output(model, batch, adapter_names=["default", "__base__"])
    model.delete_adapter("default")
    assert not hasattr(model, "prompt_encoder") or "default" not in model.prompt_encoder
    plain = model.unload()
    torch.testing.assert_close(output(plain, batch), reference, rtol=0, atol=0)


# --- errors -------------------------------------------------------------------------------------------------
def test_encoder_only_models_are_refused_clearly():
    for make in SOFT.values():
        with pytest.raises(ValueError, match="encoder-only"):
            get_peft_model(build("bert"), make())


def test_soft_prompts_are_not_mergeable():
    model = soft("prefix_tuning", "gpt2")
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(TypeError):
        model.merge_and_unload()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens"),
        (lambda: PromptTuningConfig(prompt_tuning_init="TEXT"), "needs init_text"),
        (lambda: PromptTuningConfig(init_text="x", prompt_tuning_init="RANDOM"), "init_text is set"),
        (lambda: PromptTuningConfig(prompt_tuning_init="WORDS"), "prompt_tuning_init"),
        (lambda: PromptTuningConfig(init_text="x", tokenizer_kwargs={"trust_remote_code": True}), "trust_remote_code"),
        (lambda: PrefixTuningConfig(encoder_hidden_size=0), "encoder_hidden_size"),
        (lambda: PrefixTuningConfig(num_transformer_submodules=3), "num_transformer_submodules"),
        (lambda: PromptEncoderConfig(encoder_reparameterization_type="LSTM"), "MLP"),
        (lambda: PromptEncoderConfig(encoder_num_layers=3), "encoder_num_layers"),
        (lambda: PromptTuningConfig(task_type="TRANSLATION"), "task_type"),
    ],
)
def test_config_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_lstm_p_tuning_file_loads_for_inference():
    config = PromptEncoderConfig(encoder_reparameterization_type="LSTM", inference_mode=True, num_virtual_tokens=2)
    model = get_peft_model(build("gpt2"), config)
    assert [n for n, _ in model._tuners["default"].named_parameters()] == ["prompt_encoder.default.embedding.weight"]


def test_mismatched_model_or_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="task_type='SEQ_2_SEQ_LM'"):
        get_peft_model(build("gpt2"), PromptTuningConfig(task_type="SEQ_2_SEQ_LM"))
    with pytest.raises(ValueError, match="token_dim=64 but this model needs token_dim=32"):
        get_peft_model(build("gpt2"), PromptTuningConfig(token_dim=64))
    with pytest.raises(ValueError, match="num_transformer_submodules=1 but this model needs num_transformer_submodules=2"):
        get_peft_model(build("t5"), PrefixTuningConfig(num_transformer_submodules=1))
    soft("prompt_tuning", "gpt2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(num_virtual_tokens=5)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape \(3, 32\) but the model expects \(5, 32\)"):
        PeftModel.from_pretrained(build("gpt2"), tmp_path)


def test_wrong_keys_are_refused_before_anything_is_written():
    model = soft("prompt_tuning", "gpt2")
    tuner = model._tuners["default"]
    before = tuner.tokens.embedding.weight.detach().clone()
    with pytest.raises(KeyError, match="prompt_embeddings"):
        tuner.load_state_dict({"prompt_embeddings": before, "extra": before}, source="x")
    assert torch.equal(tuner.tokens.embedding.weight, before)


def test_inputs_the_prompt_cannot_extend_are_refused():
    model = soft("prompt_tuning", "gpt2")
    batch = inputs("gpt2")
    with pytest.raises(ValueError, match="position_ids"):
        model(**batch, position_ids=torch.arange(8).expand(2, -1))
    with pytest.raises(ValueError, match="2D"):
        model(input_ids=batch["input_ids"], attention_mask=torch.ones(2, 1, 8, 8))


def test_prefix_tuning_refuses_gradient_checkpointing():
    base = build("gpt2")
    (base.activation_checkpointing_enable if hasattr(base, "activation_checkpointing_enable") else base.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(base, PrefixTuningConfig())


# --- presets -------------------------------------------------------------------------------------------------
def test_presets_build_the_configs():
    options = {"num_virtual_tokens": 8, "init_text": TEXT}
    assert get_preset("prompt_tuning").build(options) == PromptTuningConfig(num_virtual_tokens=8, init_text=TEXT)
    assert get_preset("prefix_tuning").build({"encoder_hidden_size": 64}).uses_projection
    assert not get_preset("prefix_tuning").build().uses_projection
    assert get_preset("p_tuning").build().encoder_hidden_size == 128
    with pytest.raises(ValueError, match="has no option 'init_text'"):
        get_preset("prefix_tuning").build({"init_text": TEXT})


def test_positional_arguments_are_bound_to_parameter_names():
    from peftkit.model import _keyword_inputs

    def forward(input_ids=None, attention_mask=None, **kwargs):
        pass

    assert _keyword_inputs(forward, (1, 2), {"labels": 3}) == ((), {"input_ids": 1, "attention_mask": 2, "labels": 3})
    with pytest.raises(TypeError, match="multiple values for input_ids"):
        _keyword_inputs(forward, (1,), {"input_ids": 1})

    def star(x, *rest):
        pass

    assert _keyword_inputs(star, (1, 2), {}) == ((1, 2), {})  # left positional: the call behaves as before
    lora = get_peft_model(build("gpt2"), LoraConfig(r=2, init_lora_weights=False))
    ids = inputs("gpt2")["input_ids"]
    with torch.no_grad():
        assert torch.equal(lora(ids).logits, lora(input_ids=ids).logits)
