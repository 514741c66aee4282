"""A one-minute tour: tiny Llama, add LoRA, train a few steps, merge, check the outputs agree."""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, PeftModel, get_peft_model


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16))
    model.print_trainable_parameters()
    print(model.trainable_parameters_table())

    batch = torch.randint(0, 256, (4, 32))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(20):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == 19:
            print(f"step {step:2d}  loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=batch).logits
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            torch.manual_seed(0)
            reloaded = PeftModel.from_pretrained(LlamaForCausalLM(config), d)
            same = torch.equal(reloaded(input_ids=batch).logits, unmerged)
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=batch).logits
    diff = (merged - unmerged).abs().max().item()
    print(f"saved + reloaded adapter gives identical logits: {same}")
    print(f"merged model: {type(merged_model).__name__}, max |merged - unmerged| = {diff:.2e}")
    if not same or diff > 1e-4:
        raise SystemExit("outputs disagree")


if __name__ == "__main__":
    main()
