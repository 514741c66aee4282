"""``TrainConfig``: every setting of a training run, typed and validated in one place.

The command line, a YAML ``--config`` file and ``--set key=value`` only fill this dataclass; the
training loop reads nothing else. ``run.json`` stores it, resolved, next to the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..data import PromptFormat
from ..hub import DEFAULT_MODEL
from ..config import PeftConfig
from ..options import build
from ..registry import Preset, get_preset
from .tracking import ReportTo


@dataclass
class TrainConfig:
    """A training run.

    Args:
        model: A local Hugging Face model directory, a hub id (when online) or a catalogue name
            (``peftkit models list``).
        data: Training data: a .jsonl, .json or .csv file, or a Hugging Face hub dataset ``org/name[:split]``
            (online, with ``pip install peftkit[datasets]``; split ``train`` by default). Chat ``messages``,
            ``prompt``/``completion`` and ``instruction``/``input``/``output`` rows are recognised; other
            fields are named with --input-field/--target-field (DialogSum's by default), see ``format``.
        output: Directory for the adapter (or full model), tokenizer, logs and checkpoints.
        method: The PEFT method (``peftkit methods`` lists every name with its options and default learning rate).
        method_options: Settings of the method's own config, by peft's field names (``r``, ``lora_alpha``,
            ``target_modules``, ...): ``--r 16``, ``--set lora.r=16`` or a ``lora:`` mapping in YAML. Unset
            ones take the method's defaults.
        format: The row layout, input/target fields, the prompt template, truncation.
        epochs: Passes over the data (fractions allowed); ignored when ``max_steps`` is set.
        max_steps: Optimizer steps to run; overrides ``epochs``.
        limit: Use only the first N training rows (quick experiments).
        batch_size: Examples per forward pass and process. Global batch = batch_size x grad_accum x processes.
        grad_accum: Forward/backward passes whose gradients add up to one optimizer step (a larger effective
            batch without more memory).
        lr: Peak learning rate of AdamW; none given: the method's own default (listed with the methods: adapters
            train well around 1e-4..1e-3, full fine-tuning wants ~1e-5..5e-5, soft prompts 1e-2 or more).
        weight_decay: AdamW's decoupled weight decay.
        warmup: Fraction of the steps during which the learning rate rises linearly from 0 (0.05 = the first 5%).
        schedule: Learning-rate decay after warmup: cosine or linear to 0, or constant.
        max_grad_norm: Gradients are clipped to this global L2 norm (stability); 0 turns clipping off.
        precision: ``auto`` uses bf16 autocast where the hardware runs it fast (AMX/AVX512-BF16 CPUs,
            Ampere+ GPUs) and fp32 elsewhere; trainable weights and optimizer states stay fp32 either way.
        quantize: Load the frozen base model's linear layers quantized by bitsandbytes (QLoRA): ``nf4`` (4-bit
            NormalFloat with double quantization and bf16 matmuls, as in the QLoRA paper; about a quarter of bf16's
            bytes), ``fp4`` (4-bit float), ``int8`` (LLM.int8(), about half), or ``none``. Adapter methods only (the
            base stays frozen); the adapter is an ordinary PEFT adapter. Needs ``pip install 'peftkit[quantize]'``.
        gradient_checkpointing: Recompute activations in the backward pass: less memory, ~30% slower. ``None``
            (the default): on with a quantized base (``quantize`` not ``none``), as the QLoRA paper trains and as
            ``peft``'s ``prepare_model_for_kbit_training`` does (a 4-bit base saves little when the activations
            dominate peak memory), off otherwise.
        compile: Compile the transformer blocks with torch.compile (Inductor) for training: generated kernels
            fuse the work between the matmuls. Costs compile time at the first step (20-50 s for SmolLM2-135M on a
            CPU, less on later runs, which reuse Inductor's cache); pays on runs long enough to win that back.
            Evaluation stays eager. Needs a C++ compiler on a CPU; not with sharding=fsdp or quantize. ``None`` (the
            default): on where that was measured to pay, a single bf16 process on a CPU with a C++ compiler, a
            decoder-only model and a run of at least 100,000 training tokens
            (:func:`peftkit.train.compile.auto_compile`); run.json records what ran.
        sharding: ``fsdp`` splits the model between the processes (PyTorch FSDP2): each of N processes keeps 1/N
            of every weight, frozen ones included, and of the optimizer state, for models whose full copy per
            process (DDP) does not fit. Needs several processes (torchrun or accelerate launch); an Accelerate
            FSDP config (configs/accelerate/fsdp.yaml) turns it on too. The saved adapter or model is gathered
            whole, the same as one process's. ``none``: every process holds the whole model (DDP).
        target_only_logits: Compute the output head (vocabulary projection) and the loss only where a
            label is set, not at every position; identical loss, much less work for long prompts (causal LMs
            whose forward takes a ``logits_to_keep`` mask; other models take the plain path).
        group_by_length: Batch examples of similar length together (less padding); the order stays random.
        seed: Seeds data order, adapter initialisation and dropout; the same seed gives the same run.
        log_every: Steps between lines of ``train_log.jsonl`` (and progress-bar updates).
        eval_data: Held-out file to compute the loss on during training.
        eval_every: Steps between held-out evaluations (None: only at the end).
        eval_limit: Rows of ``eval_data`` used for the held-out loss (None: all).
        save_every: Steps between checkpoints (None: no checkpoints; a crash then loses the run).
        keep_checkpoints: How many recent checkpoints to keep on disk.
        resume: Continue from the newest checkpoint in ``output``.
        cpu: Train on the CPU even when a GPU is present.
        report_to: Experiment tracker the logged numbers also go to (through Accelerate): tensorboard (event
            files in OUTPUT/logs/), wandb or mlflow (configured by their environment variables), or none.
            auto: TensorBoard when it is installed, else none. loss_curve.png is written either way.
        task: ``generate`` trains the model to write the target text; ``classify`` loads it with a new
            classification head (one output per distinct target label) and trains the adapter and the head
            (:mod:`peftkit.classify`).
    """

    model: str = DEFAULT_MODEL
    data: str = ""
    output: str = ""
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    format: PromptFormat = field(default_factory=PromptFormat)
    epochs: float = 1.0
    max_steps: int | None = None
    limit: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    warmup: float = 0.05
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    quantize: Literal["none", "nf4", "fp4", "int8"] = "none"
    gradient_checkpointing: bool | None = None
    compile: bool | None = None
    sharding: Literal["none", "fsdp"] = "none"
    target_only_logits: bool = True
    group_by_length: bool = True
    seed: int = 42
    log_every: int = 10
    eval_data: str | None = None
    eval_every: int | None = None
    eval_limit: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 1
    resume: bool = False
    cpu: bool = False
    report_to: ReportTo = "auto"
    task: Literal["generate", "classify"] = "generate"

    def __post_init__(self) -> None:
        # The method checks and converts its own options (a wrong name or value fails here, before any work).
        self.method_options = self.preset().read(self.method_options)
        self.method_config()
        positive = ["batch_size", "grad_accum", "log_every", "keep_checkpoints"]
        optional_positive = ["max_steps", "limit", "eval_every", "eval_limit", "save_every"]
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is None and name in optional_positive:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}.")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}.")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps, in [0, 1); got {self.warmup!r}.")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0.")
        for name, choices in (("schedule", ("cosine", "linear", "constant")), ("precision", ("auto", "bf16", "fp32")), ("sharding", ("none", "fsdp")),
                              ("report_to", ("auto", "tensorboard", "wandb", "mlflow", "none")),
                              ("task", ("generate", "classify")), ("quantize", ("none", "nf4", "fp4", "int8"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}.")

        if self.compile and (self.sharding != "none" or self.quantize != "none"):
            raise ValueError(f"compile=True works with sharding=none and quantize=none (got sharding={self.sharding}, "
                             f"quantize={self.quantize}); turn one of them off (--no-compile).")
        if self.quantize != "none":
            from ..registry import tuner_for

            if self.task != "generate":
                raise ValueError(f"quantize={self.quantize} works with task=generate only; use quantize=none for task={self.task}.")
            if tuner_for(self.method_config()).exclusive:
                raise ValueError(f"method {self.method!r} trains the base model's own weights, which a quantized base holds "
                                 "as frozen 4/8-bit integers; use an adapter method (lora, dora, ia3, ...) or quantize=none.")

    def preset(self) -> Preset:
        return get_preset(self.method)

    def method_config(self) -> PeftConfig:
        """The method's config (``LoraConfig``, ...): the preset's defaults with ``method_options`` applied."""
        return self.preset().build(self.method_options)

    @property
    def peak_lr(self) -> float:
        """``lr``, or the method's own default when none was given."""
        return self.lr if self.lr is not None else self.preset().default_lr

    def check_required(self) -> None:
        if not self.data:
            raise ValueError("No training data: give --data FILE (.jsonl, .json or .csv).")
        if not self.output:
            raise ValueError("No output directory: give --output DIR.")


# Settings that may change between a run and its --resume (they do not change what is computed; compile changes
# only the rounding, as a different kernel order does).
RESUMABLE_CHANGES = {"compile", "resume", "report_to", "log_every", "eval_data", "eval_every", "eval_limit", "save_every", "keep_checkpoints", "output"}


def build_train_config(yaml_path: str | None = None, sets: list[str] | None = None, **flags) -> TrainConfig:
    """Defaults, then the YAML file, then ``--set`` pairs, then explicit flags (later wins); validated."""
    return build(TrainConfig, yaml_path, sets, **flags)
