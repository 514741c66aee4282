"""Regional compilation for training: each transformer block compiled in place by ``torch.compile``.

A decoder repeats one block class (SmolLM2-135M: 30 ``LlamaDecoderLayer``). Compiling each block
(``block.compile()``) instead of the whole model keeps the compile time that of one block: torch.compile
treats a module's parameters as inputs, so the 30 blocks share one compiled forward and one backward.
Embeddings, the output head and the loss stay eager (the head runs on the target positions only, see
:mod:`peftkit.train.loss`, a data-dependent shape that would recompile at every batch).

What Inductor gains: it fuses the work between the matmuls (RMSNorm, rotary embeddings, SiLU x up, residual
adds, the bf16 casts of autocast, the adapters' scaling and adds) into a few generated kernels (AVX-512/AMX
code on a CPU, Triton on a GPU), in the forward and the backward; the large matmuls still run in oneDNN/cuBLAS.
What it costs: the first step compiles (tens of seconds to minutes on a busy CPU), and a batch of a new shape
compiles once more (from the second length on, one graph for every length). Evaluation and generation run
eager (:func:`eager`): a compiled inference graph would be a second compile for a few forward passes.

Names in the compiled modules' ``state_dict`` are unchanged (``Module.compile`` compiles in place, unlike
``torch.compile(module)``, which would wrap it), so checkpoints and saved adapters are the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .loss import transformers_model

__all__ = ["compile_blocks", "eager"]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (a PeftModel or a transformers model): the classes transformers
    never splits between devices (``_no_split_modules``), the same units FSDP shards."""
    names = set(getattr(transformers_model(model), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model: nn.Module, **options) -> int:
    """Compile every transformer block of ``model`` in place (``options`` go to ``torch.compile``); returns how
    many. Raises ValueError when the model names no block class to compile."""
    found = blocks(model)
    if not found:
        raise ValueError(f"--compile: {type(transformers_model(model)).__name__} names no transformer block class "
                         "(_no_split_modules), so there is no repeated block to compile; train without --compile.")
    for block in found:
        block.compile(**options)
    return len(found)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Within the block, compiled modules run their plain Python code (no compiling, no recompiling)."""
    with torch.compiler.set_stance("force_eager"):
        yield
