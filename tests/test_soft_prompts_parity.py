"""Parity with the reference ``peft`` package for prompt tuning, prefix tuning (with and without the
reparameterization MLP) and P-tuning on tiny GPT-2, Llama, T5 and BART models: equal outputs for equal
weights, peftkit's files load in ``peft`` and ``peft``'s files load in peftkit, with equal outputs.

``peft``'s own ``generate`` for soft prompts disagrees with its ``forward`` under transformers 5.2x
(it keeps bookkeeping of ``cache_position`` that transformers no longer uses), so generation is
compared with greedy decoding by ``peft``'s forward.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, build, inputs
from test_soft_prompts import TEXT, greedy, tiny_tokenizer

import peftkit

peft = pytest.importorskip("peft")

P = 3
METHODS = {
    "prompt_tuning": (
        lambda: peftkit.PromptTuningConfig(num_virtual_tokens=P),
        lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P),
    ),
    "prefix_tuning": (
        lambda: peftkit.PrefixTuningConfig(num_virtual_tokens=P),
        lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P),
    ),
    "prefix_tuning_mlp": (
        lambda: peftkit.PrefixTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16),
        lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=16),
    ),
    "p_tuning": (
        lambda: peftkit.PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16),
        lambda task: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=16),
    ),
}
ARCH_LIST = ["gpt2", "llama", "t5", "bart"]
TOL = 1e-5


def task(arch: str) -> str:
    return "SEQ_2_SEQ_LM" if ARCHS[arch].seq2seq else "CAUSAL_LM"


def nudge(model, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def run(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    return out.logits, out.loss


def compare(ours, theirs, what: str) -> float:
    (logits_a, loss_a), (logits_b, loss_b) = ours, theirs
    assert logits_a.shape == logits_b.shape, what
    diff = max((logits_a - logits_b).abs().max().item(), (loss_a - loss_b).abs().item())
    print(f"parity {what}: max abs diff {diff:.3g}")
    assert diff <= TOL, f"{what}: max abs diff {diff}"
    return diff


def reference(method: str, arch: str):
    model = peft.get_peft_model(build(arch), METHODS[method][1](task(arch)))
    nudge(model)
    return model.eval()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCH_LIST)
def test_same_weights_give_the_same_outputs(method, arch):
    """Training-time computation (reparameterization networks included) matches peft's."""
    theirs = reference(method, arch)
    ours = peftkit.get_peft_model(build(arch), METHODS[method][0]())
    mine = dict(ours._tuners["default"].named_parameters())
    with torch.no_grad():
        for name, p in theirs.prompt_encoder["default"].named_parameters():
            target = mine[f"prompt_encoder.default.{name}"]
            target.copy_(p[: target.shape[0]])  # peft keeps P unused decoder rows on seq2seq prompt tuning
    batch = inputs(arch)
    compare(run(ours.eval(), batch), run(theirs, batch), f"{method}/{arch} same weights")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCH_LIST)
def test_peftkit_files_load_in_peft(method, arch, tmp_path):
    ours = peftkit.get_peft_model(build(arch), METHODS[method][0]())
    nudge(ours)
    ours.eval()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(arch), tmp_path).eval()
    assert theirs.peft_config["default"].peft_type.value == type(ours.peft_config["default"]).peft_type
    batch = inputs(arch)
    compare(run(ours, batch), run(theirs, batch), f"{method}/{arch} peftkit file -> peft")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCH_LIST)
def test_peft_files_load_in_peftkit(method, arch, tmp_path):
    theirs = reference(method, arch)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(build(arch), tmp_path)
    batch = inputs(arch)
    compare(run(ours, batch), run(theirs, batch), f"{method}/{arch} peft file -> peftkit")
    # generate: greedy decoding by peft's forward (see the module docstring)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4, min_new_tokens=2)
    assert ours.generate(**kwargs, do_sample=False).tolist() == greedy(theirs, arch, batch, 4, min_new_tokens=2).tolist()


def test_init_from_text_matches_peft(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    theirs = peft.get_peft_model(
        build("llama"),
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text=TEXT, tokenizer_name_or_path=tokenizer),
    )
    ours = peftkit.get_peft_model(build("llama"), peftkit.PromptTuningConfig(num_virtual_tokens=7, init_text=TEXT, tokenizer_name_or_path=tokenizer))
    assert torch.equal(ours._tuners["default"].tokens(), theirs.prompt_encoder["default"].embedding.weight)


@pytest.mark.parametrize("layers", [3, 4])
def test_seq2seq_prefix_layout_matches_peft_for_other_layer_counts(layers, tmp_path):
    """peft's decoder-layer -> prefix-row mapping (rows 4i mod 2L, 4i+1 mod 2L) differs by layer count."""
    import transformers

    def t5():
        torch.manual_seed(0)
        config = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_heads=4,
                                       dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return transformers.T5ForConditionalGeneration(config).eval()

    theirs = peft.get_peft_model(t5(), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    nudge(theirs)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(t5(), tmp_path)
    batch = inputs("t5")
    compare(run(ours, batch), run(theirs.eval(), batch), f"prefix_tuning/t5 with {layers} layers peft file -> peftkit")
    with torch.no_grad():
        base = t5()(**batch).logits
    assert not torch.allclose(base, run(theirs, batch)[0], atol=1e-3)  # the prefix does change the outputs
