"""peftkit with TRL's SFTTrainer and transformers' Trainer, offline, on a tiny random Llama (~1 minute on a CPU).

    python -m peftkit.examples.trainer_trl

Trains LoRA for a few steps with each trainer, then loads the saved adapter back with
``AutoPeftModelForCausalLM`` (the base model is found through ``base_model_name_or_path``) and checks the
logits match. Needs ``trl`` and ``datasets`` (``pip install trl datasets``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainingArguments
from trl import SFTConfig

from peftkit import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
from peftkit.trainers import SFTTrainer, Trainer


def tiny_model_and_tokenizer(directory: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random 2-layer Llama and a 100-word tokenizer, saved in ``directory`` like any local model."""
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 100)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return LlamaForCausalLM.from_pretrained(directory), tokenizer


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, tokenizer = tiny_model_and_tokenizer(tmp / "base")
        texts = [" ".join(f"w{3 + (7 * i + 3 * j) % 97}" for j in range(12)) for i in range(16)]
        common = dict(per_device_train_batch_size=4, max_steps=8, learning_rate=5e-3, logging_steps=4,
                      save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True, activation_checkpointing=True)

        # TRL: a peftkit config where TRL takes peft_config (peftkit.trainers.SFTTrainer accepts it).
        sft = SFTTrainer(model=base, peft_config=LoraConfig(r=8, lora_alpha=16), processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"text": texts}),
                         args=SFTConfig(output_dir=str(tmp / "sft"), max_length=16, **common))
        sft.train()
        sft.save_model(tmp / "sft-adapter")  # adapter_config.json + adapter_model.safetensors
        print("SFTTrainer losses:", [round(h["loss"], 3) for h in sft.state.log_history if "loss" in h])

        # transformers.Trainer: a peftkit model, tokenized rows; checkpoints are adapters and resume works.
        model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp / "base"), LoraConfig(r=8, lora_alpha=16))
        rows = tokenizer(texts)
        rows["labels"] = rows["input_ids"]
        trainer = Trainer(model=model, train_dataset=Dataset.from_dict(dict(rows)),
                          args=TrainingArguments(output_dir=str(tmp / "run"), **common))
        trainer.train()
        trainer.save_model(tmp / "adapter")
        print("Trainer losses:", [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h])
        print("checkpoint files:", sorted(p.name for p in (tmp / "run" / "checkpoint-4").iterdir()))

        reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp / "adapter")  # finds tmp/base by itself
        batch = tokenizer(texts[:2], return_tensors="pt")
        with torch.no_grad():
            same = torch.allclose(model.eval()(**batch).logits, reloaded(**batch).logits, atol=1e-6)
        print("reloaded adapter gives the trained model's logits:", same)
        assert same


if __name__ == "__main__":
    main()
