"""The hardware-limit arithmetic of ``bench/bench_train_step.py`` (``bench/roofline.py``): the FLOPs it
counts for a LoRA training step are the FLOPs the step runs, and the peak rate is a real measurement.

The FLOP count of a step is taken by torch's ``FlopCounterMode`` (every matmul forward and backward) plus
attention from the shapes; this checks it against the count derived from the model's config alone (every
frozen linear layer forward and its input gradient, the first layer's q/k/v excepted, the head at the loss's
positions, the LoRA pairs), on a small Llama-shaped model, with LoRA on q/v as the benchmark runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from roofline import analytic_step_flops, attention_flops, peak_matmul_rate, step_flops  # noqa: E402

from peftkit import LoraConfig, get_peft_model  # noqa: E402


def small_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("targets", ["q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"])
def test_counted_step_flops_equal_the_count_from_the_config(targets):
    rows, tokens, rank = 2, 16, 4
    names = targets.split(",")
    model = get_peft_model(small_llama(), LoraConfig(r=rank, lora_alpha=8, target_modules=names, init_lora_weights=False)).train()
    ids = torch.randint(3, 256, (rows, tokens), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()  # logits at every position: the head counts all of them
        optimizer.step()
        optimizer.zero_grad()

    counted = step_flops(step, model.config, rows, tokens)
    analytic = analytic_step_flops(model.config, rows, tokens, targets=rows * tokens, adapted=dict.fromkeys(names, rank))
    assert counted["attention"] == analytic["attention"] == attention_flops(model.config, rows, tokens)
    assert counted["total"] == analytic["total"], (counted, analytic)


def test_attention_flops_causal_is_half_of_full():
    cfg = small_llama().config
    full = attention_flops(cfg, 2, 16, causal=False)
    assert full == 3 * 2 * (2 * 2 * 16 * 16 * 64) * 3  # (fwd + 2x bwd) x 2 products x 2*B*S*S*d x layers
    assert attention_flops(cfg, 2, 16) * 2 == full


def test_peak_matmul_rate_is_measured():
    rate, shape = peak_matmul_rate(torch.device("cpu"), torch.float32, seconds=0.05, shapes=((256, 256, 256),))
    assert rate > 1e8 and "@" in shape  # any CPU of the last 20 years does 0.1 GFLOP/s in fp32
