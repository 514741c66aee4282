"""A tiny Llama + word-level tokenizer saved as a model directory, three LoRA adapters, an in-process
server on a free 127.0.0.1 port, and the offline reference outputs. Nothing is downloaded."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from peftkit import LoraConfig, PeftModel, get_peft_model

WORDS = (
    "the a cat dog sat on mat and ran to park hello world how are you today summarize this text please answer "
    "yes no good bad red blue green one two three four five six seven eight nine ten bird fish tree house car "
    "road river sun moon star rain snow wind fire water stone book pen paper door window chair table cup plate "
    "apple bread milk tea coffee happy sad fast slow big small old new hot cold up down left right"
).split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
CONTEXT = 96  # max_position_embeddings of the tiny model
ADAPTERS = ("alpha", "beta", "gamma")


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for word in ["user", "assistant", "system", *WORDS]:
        vocab.setdefault("\u2581" + word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=CONTEXT,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model_dir(root: Path) -> tuple[Path, dict[str, Path]]:
    """``root/tiny-llama`` (model + tokenizer) and ``root/adapters/<name>`` for each of ADAPTERS."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CONTEXT, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attention_bias=True,  # (initialised to 0) so that adapters that train biases have some to write into
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model_dir = root / "tiny-llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    adapters = {}
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(100 + i)
        targets = [["q_proj", "v_proj", "up_proj"], ["k_proj", "o_proj"], ["gate_proj", "down_proj", "v_proj"]][i]
        peft_model = get_peft_model(load_model(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():  # make each adapter's effect large enough to change greedy outputs
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.mul_(3.0)
        adapters[name] = root / "adapters" / name
        peft_model.save_pretrained(adapters[name])
    return model_dir, adapters


def load_model(model_dir: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


class Offline:
    """Reference outputs: each adapter loaded on its own (``PeftModel.from_pretrained``) and run with
    plain ``generate``, one prompt at a time, no server code involved."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path], eos_ids: list[int]):
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.model_dir, self.adapters, self.eos_ids = model_dir, adapters, eos_ids
        self._models: dict[str, torch.nn.Module] = {}

    def model(self, name: str | None) -> torch.nn.Module:
        key = name or "__base__"
        if key not in self._models:
            base = load_model(self.model_dir)
            self._models[key] = base if name is None else PeftModel.from_pretrained(base, self.adapters[name])
        return self._models[key]

    def generate_ids(self, name: str | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = self.model(name).generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                eos_token_id=self.eos_ids, pad_token_id=0,
            )
        return out[0, len(prompt_ids):].tolist()

    def text(self, name: str | None, prompt_ids: list[int], max_tokens: int) -> str:
        ids = self.generate_ids(name, prompt_ids, max_tokens)
        if ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def completion(self, name: str | None, prompt: str, max_tokens: int) -> str:
        return self.text(name, self.tokenizer(prompt).input_ids, max_tokens)

    def chat(self, name: str | None, messages: list[dict], max_tokens: int) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.text(name, self.tokenizer(text, add_special_tokens=False).input_ids, max_tokens)


class LiveServer:
    """uvicorn in a background thread of this process, on a free 127.0.0.1 port."""

    def __init__(self, app, engine):
        import uvicorn

        self.app, self.engine = app, engine
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()
        assert not self.thread.is_alive(), "the test server did not shut down"


@contextlib.contextmanager
def paused(engine):
    engine.pause()
    try:
        yield
    finally:
        engine.resume()


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` (no timing assertion: the deadline only stops a hung test)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def build_server(model_dir: Path, adapters: dict[str, Path], **options):
    """``(app, engine)`` as ``peftkit serve`` builds them (same code path: ``build(ServeConfig)``)."""
    from peftkit.serve.app import build
    from peftkit.serve.config import ServeConfig

    config = ServeConfig(model=str(model_dir), adapters={n: str(p) for n, p in adapters.items()}, **options)
    return build(config)


@contextlib.contextmanager
def slow_steps(engine, seconds: float = 0.02):
    """Make every engine step take at least ``seconds`` longer, so that a request the test has just seen
    start is still running a moment later even on a loaded machine (the outputs do not change)."""
    step = engine._step

    def slow():
        step()
        time.sleep(seconds)

    engine._step = slow
    try:
        yield
    finally:
        del engine._step  # back to the class's method


def model_state(model: torch.nn.Module) -> tuple:
    """Everything a failed adapter load must leave as it was: each module (name, class, training flag)
    and each parameter and buffer (name, requires_grad, SHA-256 of its bytes)."""
    import hashlib

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()

    modules = [(n, type(m).__name__, m.training) for n, m in model.named_modules()]
    params = [(n, p.requires_grad, str(p.dtype), tuple(p.shape), digest(p)) for n, p in model.named_parameters()]
    buffers = [(n, str(b.dtype), tuple(b.shape), digest(b)) for n, b in model.named_buffers()]
    return modules, params, buffers


def make_unservable_adapters(model_dir: Path, root: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Adapter folders under ``root`` that a server must refuse, each with a word its refusal must contain:
    ones that write into the base model (full and selective fine-tuning, LoRA training biases), one that
    cannot share a batch (a soft prompt), and broken copies of the valid adapter ``good``."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from peftkit import FullConfig, PromptTuningConfig, SelectiveConfig

    out: dict[str, tuple[Path, str]] = {}

    def trained(name: str, config, must_say: str) -> None:
        peft_model = get_peft_model(load_model(model_dir), config)
        with torch.no_grad():  # as if trained: every value it would write differs from the base model's
            for _, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(0.5)
        peft_model.save_pretrained(root / name)
        out[name] = (root / name, must_say)

    trained("full", FullConfig(), "base model's own weights")
    trained("lora-bias-all", LoraConfig(r=2, target_modules=["q_proj"], bias="all"), "bias='all'")
    trained("lora-bias-lora-only", LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"), "bias='lora_only'")
    trained("bitfit", SelectiveConfig(patterns=[r"\.bias$"]), "base model's own weights")
    trained("prompt-tuning", PromptTuningConfig(num_virtual_tokens=3), "batch shared")

    def broken(name: str, must_say: str, config_edit=None, tensors_edit=None, raw_weights: bytes | None = None) -> None:
        folder = root / name
        shutil.copytree(good, folder)
        if config_edit is not None:
            config = json.loads((folder / "adapter_config.json").read_text())
            config_edit(config)
            (folder / "adapter_config.json").write_text(json.dumps(config))
        weights = folder / "adapter_model.safetensors"
        if tensors_edit is not None:
            tensors = load_file(weights)
            tensors_edit(tensors)
            save_file(tensors, weights)
        if raw_weights is not None:
            weights.write_bytes(raw_weights)
        out[name] = (folder, must_say)

    def wrong_shape(t: dict) -> None:
        key = sorted(k for k in t if "lora_B" in k)[0]
        t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])

    weights = (good / "adapter_model.safetensors").read_bytes()
    broken("wrong-shape", "shape", tensors_edit=wrong_shape)
    broken("missing-tensor", "missing", tensors_edit=lambda t: t.pop(sorted(t)[0]))
    broken("truncated-weights", "safetensors", raw_weights=weights[: len(weights) // 2])
    broken("not-json", "JSON", config_edit=None)
    (root / "not-json" / "adapter_config.json").write_text("{ not json")
    broken("unknown-method", "peft_type", config_edit=lambda c: c.update(peft_type="NO_SUCH_METHOD"))
    broken("bad-target-regex", "q_proj((", config_edit=lambda c: c.update(target_modules="q_proj(("))
    broken("bad-rank-regex", "q_proj((", config_edit=lambda c: c.update(rank_pattern={"q_proj((": 8}))
    broken("absurd-rank", "", config_edit=lambda c: c.update(r=2**40))
    broken("no-target", "target", config_edit=lambda c: c.update(target_modules=["no_such_module"]))
    broken("pickle-only", "pickle", raw_weights=b"")
    (root / "pickle-only" / "adapter_model.safetensors").rename(root / "pickle-only" / "adapter_model.bin")
    return out
