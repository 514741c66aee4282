"""Regional compilation for training: transformer blocks compiled in place by ``torch.compile``.

A decoder repeats one block class (SmolLM2-135M: 30 ``LlamaDecoderLayer``). Compiling each block
(``block.compile()``) instead of the whole model keeps the compile time that of one block: torch.compile
treats a module's parameters as inputs, so the blocks share one compiled forward and one backward.
Embeddings, the output head and the loss stay eager (the head runs on the target positions only, see
:mod:`peftkit.train.loss`, a data-dependent shape that would recompile at every batch).

One graph, compiled once: the blocks compile with dynamic shapes from the start (length-grouped batches
change length at every step; compiling for the first length, then again for any length, costs a second
compile), and the first block of each stack stays eager. It reads the frozen embeddings, so its input needs
no gradient while every later block's does, and compiling it would compile a second graph for one block's
speed. Measured on SmolLM2-135M (bf16, one CPU thread, 24 DialogSum steps of 4): one compile instead of four,
about 20 s of first-step overhead instead of about 60 s.

What Inductor gains: it fuses the work between the matmuls (RMSNorm, rotary embeddings, SiLU x up, residual
adds, the bf16 casts of autocast, the adapters' scaling and adds) into a few generated kernels (AVX-512/AMX
code on a CPU, Triton on a GPU), in the forward and the backward; the large matmuls still run in oneDNN/cuBLAS.
What it costs: the first step compiles (tens of seconds on a CPU). Evaluation and generation run eager
(:func:`eager`): a compiled inference graph would be a second compile for a few forward passes.

``peftkit train`` compiles by default where that was measured to pay (:func:`auto_compile`).

On a CPU, before its first compile Inductor checks which vector instruction sets (AMX, AVX-512 VNNI, AVX-512,
AVX2) the host's C++ compiler can build torch's vector code for: one test build of ATen's vector headers per set
the CPU lists, about 3.5 s each on this machine (14 s of a cold one-thread compile), though it then uses only the
first that passes. :func:`probe_vector_isa` builds that test for the first set only and lets the others pass
unbuilt; if the first fails, Inductor checks them all as before.

Names in the compiled modules' ``state_dict`` are unchanged (``Module.compile`` compiles in place, unlike
``torch.compile(module)``, which would wrap it), so checkpoints and saved adapters are the same.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator

import torch
from torch import nn

from .loss import transformers_model

__all__ = ["auto_compile", "compile_blocks", "eager", "probe_vector_isa"]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (a PeftModel or a transformers model): the classes transformers
    never splits between devices (``_no_split_modules``), the same units FSDP shards."""
    names = set(getattr(transformers_model(model), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model: nn.Module, **options) -> tuple[int, int]:
    """Compile the transformer blocks of ``model`` in place, all but the first of each stack (see above), with
    dynamic shapes (``options`` go to ``torch.compile`` and may override that); returns (compiled, blocks).
    Raises ValueError when the model names no block class to compile."""
    found = blocks(model)
    if not found:
        raise ValueError(f"--compile: {type(transformers_model(model)).__name__} names no transformer block class "
                         "(_no_split_modules), so there is no repeated block to compile; train without --compile.")
    named = {id(m): name for name, m in model.named_modules()}
    later = [block for block in found if not named[id(block)].endswith(".0")]  # ".0": first in its ModuleList
    if options.get("backend", "inductor") == "inductor" and any(p.device.type == "cpu" for p in model.parameters()):
        probe_vector_isa()  # only Inductor builds C++ for a CPU
    for block in later:
        block.compile(**{"dynamic": True, **options})
    return len(later), len(found)


def probe_vector_isa() -> str | None:
    """Check only the vector instruction set Inductor will use on this CPU (see above) and return its name; None
    where Inductor checks them itself: the user chose (TORCHINDUCTOR_VEC_ISA_OK, ``cpp.simdlen``,
    ATEN_CPU_CAPABILITY), this process already checked, the CPU lists none, the first failed its test build, the
    check raised, or this torch's Inductor lacks what this relies on."""
    try:
        from torch._inductor import config, cpu_vec_isa

        listed_by_cpu, test_code = cpu_vec_isa.valid_vec_isa_list, cpu_vec_isa.VecISA._avx_code
        if (config.cpp.vec_isa_ok is not None or config.cpp.simdlen is not None or os.environ.get("ATEN_CPU_CAPABILITY")
                or listed_by_cpu.cache_info().currsize):
            return None
    except (ImportError, AttributeError):
        return None
    try:
        with config.patch({"cpp.vec_isa_ok": True}):  # the sets the CPU lists; their small intrinsic checks still run
            listed = listed_by_cpu()
        if listed and listed[0].check_build(test_code):  # Inductor's own test, for the set it picks first
            return str(listed[0])
    except Exception:  # whatever went wrong, Inductor's own check decides, as without this
        pass
    # Undo: Inductor checks every set again, without the answers given under the patch.
    listed_by_cpu.cache_clear()
    for cls in {c for isa in cpu_vec_isa.supported_vec_isa_list for c in type(isa).__mro__}:
        getattr(cls.__dict__.get("__bool__"), "cache_clear", lambda: None)()
    return None


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Within the block, compiled modules run their plain Python code (no compiling, no recompiling)."""
    with torch.compiler.set_stance("force_eager"):
        yield


# `peftkit train`'s default (compile=None) compiles when the run has at least this many training tokens. On
# SmolLM2-135M (bf16, one torch thread, 2026-12-02), a first run on the machine (empty Inductor cache, its headers
# precompiled afresh, one compile thread) lost about 53 s to the compile in its first 10 steps; the compiled blocks
# then trained 400-470 tokens/s against 230-320 eager in a quiet hour (1.4 ms saved a token: won back after about
# 40k tokens) but 240-320 against 200-260 in a slow one (0.6 ms: about 90k). Side by side in the slow hour, 128
# DialogSum rows (35.7k tokens) trained in 161 and 177 s eager against 199 and 208 s compiled. So 100k.
AUTO_MIN_TOKENS = 100_000


def auto_compile(model: nn.Module, device: torch.device, bf16: bool, world: int, seq2seq: bool, planned_tokens: int) -> tuple[bool, str]:
    """Whether ``peftkit train`` compiles when the user did not say (``compile=None``), and why, for its log:
    yes for a single-process, bf16 run on a CPU with a C++ compiler (Inductor's CPU code is C++), a decoder-only
    model with a repeated block class, and at least :data:`AUTO_MIN_TOKENS` training tokens, where it was
    measured to pay. GPUs, fp32, encoder-decoders and several processes were not measured: ``--compile`` there."""
    if device.type != "cpu" or not bf16 or world > 1 or seq2seq:
        return False, ("compiled by default only where that was measured: a decoder-only model, bf16, one process, no quantization or "
                       "sharding, a CPU")
    if not blocks(model):
        return False, "the model names no repeated transformer block to compile"
    compiler = os.environ.get("CXX") or {"darwin": "clang++", "win32": "cl"}.get(sys.platform, "g++")  # as Inductor looks
    if shutil.which(compiler) is None:
        return False, f"no C++ compiler ({compiler}) for torch.compile's CPU code"
    if planned_tokens < AUTO_MIN_TOKENS:
        return False, f"a run of {planned_tokens:,d} training tokens is too short to win back the compile time ({AUTO_MIN_TOKENS:,d} or more compile)"
    return True, f"a run of {planned_tokens:,d} training tokens wins back the compile time"
