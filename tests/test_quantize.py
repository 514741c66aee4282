"""A quantized base (bitsandbytes nf4 / int8) under peftkit adapters: training, parity with the real ``peft`` on the
same quantized base, merging by dequantizing, prepare_model_for_kbit_training, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'peftkit[quantize]')")

from conftest import VOCAB  # noqa: E402
from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from peftkit.quantize import (  # noqa: E402
    dequantized_weight,
    is_quantized_linear,
    keep_training_layout,
    quantization_config,
    quantized_kind,
    weight_bytes,
)
from tiny_pipeline import dialogue_rows, tokenizer, write_jsonl  # noqa: E402


def _llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    # Sizes of 64: bitsandbytes quantizes 4-bit weights in blocks of 64 values (the conftest models are 32 wide).
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama-64")
    _llama().save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)


def load(model_dir: str, kind: str, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization_config(kind), device_map={"": "cpu"}, dtype=dtype
    ).eval()


IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def train_steps(model, steps: int = 3) -> list[float]:
    """A few SGD steps of next-token loss on IDS: enough to move every adapter tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


CASES = {
    "lora-nf4": ("nf4", lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
    "lora-int8": ("int8", lambda: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
    "dora-nf4": ("nf4", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "ia3-int8": ("int8", lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_trains_on_a_quantized_base_and_loads_in_peft_with_equal_outputs(case, model_dir, tmp_path):
    """The adapter wraps the bitsandbytes layer itself (base output from the quantized module, plus the adapter
    path), only adapter tensors train, the 4/8-bit weights stay as they were, and the saved file is an ordinary
    PEFT adapter: the real peft, on the same quantized base, computes the same outputs with it."""
    from peft import PeftModel as RefPeftModel

    kind, make_config = CASES[case]
    base = load(model_dir, kind)
    q_proj = base.model.layers[0].self_attn.q_proj
    packed_before = q_proj.weight.data.clone()
    model = get_peft_model(base, make_config())
    host = model.get_base_model().model.layers[0].mlp.down_proj
    assert is_quantized_linear(host.base_layer), type(host.base_layer)
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_before and all(p.dtype == torch.float32 for p in adapter_before.values())

    losses = train_steps(model)
    assert losses[-1] < losses[0], losses
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, adapter_before[n])]
    assert len(moved) == len(adapter_before), f"{len(adapter_before) - len(moved)} adapter tensors got no update"
    assert torch.equal(q_proj.weight.data, packed_before)  # the frozen quantized weights are untouched

    model.eval()
    ours = logits(model)
    model.save_pretrained(tmp_path / "adapter")

    reference_base = load(model_dir, kind)
    keep_training_layout(reference_base)  # the same bitsandbytes kernels on both sides (see keep_training_layout)
    reference = RefPeftModel.from_pretrained(reference_base, tmp_path / "adapter").eval()
    assert torch.allclose(logits(reference), ours, atol=1e-4, rtol=1e-4), (logits(reference) - ours).abs().max()
    # and back: the adapter peft loaded, saved by peft, loads in peftkit on a fresh quantized base
    reference.save_pretrained(tmp_path / "from-peft")
    again = PeftModel.from_pretrained(load(model_dir, kind), tmp_path / "from-peft").eval()
    assert torch.allclose(logits(again), ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_merge_and_unload_dequantizes_and_merges_in_full_precision(kind, model_dir, tmp_path):
    base = load(model_dir, kind)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    unmerged = logits(model)
    with pytest.raises(RuntimeError, match="merge_and_unload"):  # in place would round the update to 4/8 bits
        model.merge_adapter()
    expected = {}  # what the merge must write: dequantized W + s B A, in fp32
    for path, layer in model._tuners["default"].layers():
        weight = dequantized_weight(model.get_base_model().get_submodule(path).base_layer)
        expected[path] = weight + layer.delta_weight()

    merged = model.merge_and_unload()
    assert not any(is_quantized_linear(m) for m in merged.modules())
    assert quantized_kind(merged) is None and getattr(merged.config, "quantization_config", None) is None
    for path, weight in expected.items():
        assert torch.allclose(merged.get_submodule(path).weight, weight, atol=1e-6), path
    diff = (logits(merged) - unmerged).abs().max().item()
    # What is left is the quantized layers' own arithmetic (bf16 matmuls for nf4, int8 activations for int8).
    assert diff < 0.05 * unmerged.abs().max().item(), diff

    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # an ordinary model
    assert quantized_kind(reloaded) is None and reloaded.dtype == torch.float32
    assert torch.equal(logits(reloaded), logits(merged))


def test_merge_and_unload_can_requantize_and_write_bf16(model_dir):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(0)
    full_precision = get_peft_model(load(model_dir, "nf4"), config).merge_and_unload()
    torch.manual_seed(0)  # the same random adapter again
    requantized = get_peft_model(load(model_dir, "nf4"), config).merge_and_unload(requantize=True)
    q = requantized.model.layers[0].mlp.down_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4" and q.weight.compress_statistics
    assert quantized_kind(requantized) == "nf4"
    assert weight_bytes(requantized)["linear"] == weight_bytes(load(model_dir, "nf4"))["linear"]  # the base's size again
    merged_weight = full_precision.model.layers[0].mlp.down_proj.weight
    error = (dequantized_weight(q) - merged_weight).norm() / merged_weight.norm()
    assert 0 < error < 0.15, error  # W + s B A, rounded to nf4 (4-bit rounding is ~10% of a weight's norm)

    bf16 = get_peft_model(load(model_dir, "nf4"), config).merge_and_unload(dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_nf4_base_weights_take_about_a_quarter_of_bf16(model_dir):
    quantized = weight_bytes(load(model_dir, "nf4"))["linear"]
    bf16 = weight_bytes(transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16))["linear"]
    int8 = weight_bytes(load(model_dir, "int8"))["linear"]
    # 4 bits per weight + one 8-bit scale per 64 weights (double quantization): QLoRA's ~4.13 bits, plus per
    # layer a few small tables (the 256-entry code of the scales' own quantization), which only weigh in on a
    # model this small (bench/bench_quantized.py measures a real one).
    assert 0.25 < quantized / bf16 < 0.38, quantized / bf16
    assert 0.5 < int8 / bf16 < 0.56, int8 / bf16


def test_prepare_model_for_kbit_training_matches_peft(model_dir):
    from peft import prepare_model_for_kbit_training as reference

    ours = prepare_model_for_kbit_training(load(model_dir, "nf4", dtype=torch.bfloat16))
    theirs = reference(load(model_dir, "nf4", dtype=torch.bfloat16))
    dtypes = lambda m: {n: (p.dtype, p.requires_grad) for n, p in m.named_parameters()}  # noqa: E731
    assert dtypes(ours) == dtypes(theirs)
    assert ours.model.norm.weight.dtype == torch.float32 and not any(p.requires_grad for p in ours.parameters())
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    # and the adapter then gets gradients through the checkpointed, quantized blocks
    model = get_peft_model(ours, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # A: 0 while B = 0


def _cli(capsys, *args: str) -> str:
    from peftkit.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return out.out


def test_cli_train_quantized_then_eval_and_merge(model_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", dialogue_rows(8, seed=0))
    out = _cli(capsys, "train", "--model", model_dir, "--data", train, "--output", str(tmp_path / "run"), "--quantize", "nf4",
               "--max-steps", "2", "--batch-size", "4", "--r", "4", "--report-to", "none")
    assert "(nf4-quantized)" in out
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert recorded["config"]["quantize"] == "nf4"
    assert recorded["config"]["gradient_checkpointing"] is True  # the default with a quantized base, as QLoRA trains
    adapter_config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"  # an ordinary PEFT adapter

    # eval loads the base quantized, as the adapter was trained (run.json), without being told
    from peftkit.evaluate import load_for_inference

    model, _, _ = load_for_inference(None, str(tmp_path / "run"), torch.device("cpu"))
    assert quantized_kind(model.get_base_model()) == "nf4"

    out = _cli(capsys, "merge", "--adapter", str(tmp_path / "run"), "--output", str(tmp_path / "merged"), "--dtype", "bfloat16")
    assert "from a nf4 base: dequantized to bfloat16" in out and "max |logit difference|" in out
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config and merged_config["dtype"] == "bfloat16"


def test_quantize_refuses_methods_that_train_base_weights():
    from peftkit.train import TrainConfig

    with pytest.raises(ValueError, match="trains the base model's own weights"):
        TrainConfig(method="full", quantize="nf4")
    with pytest.raises(ValueError, match="quantize must be one of"):
        TrainConfig(quantize="int4")
