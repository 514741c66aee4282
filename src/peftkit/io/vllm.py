"""Will vLLM load this adapter? The rules of vLLM's LoRA loader, checked on an ``adapter_config.json`` and its tensor names.

vLLM serves LoRA adapters saved in the Hugging Face PEFT format, next to the unchanged base model. The rules
below are read from vLLM's source (github.com/vllm-project/vllm), not remembered:

- ``vllm/lora/peft_helper.py`` (``PEFTHelper``: ``from_dict``, ``_validate_features``, ``validate_legal``),
  read at commit e745bafffc44744aa601169f8c6f325e47ca7cd5 and in a newer copy of the same file (with ``rank_pattern``,
  ``lora_bias`` and ``init_lora_weights`` checks) that the code index holds without its repository or commit, so
  possibly a branch: where the two differ, both are named below. The features only that copy refuses are ones vLLM
  does not implement, so an older vLLM that lets them through serves a different model than PEFT would:
  ``r``, ``lora_alpha`` and ``target_modules`` are required (so only LoRA adapters load); ``use_dora`` is refused
  ("vLLM does not yet support DoRA."); ``modules_to_save`` is refused unless it names only a classification head
  (``classifier`` or ``score``; older versions refuse any); ``bias`` other than ``"none"`` is refused ("Adapter
  bias is not supported."; versions up to e745baff accepted it only with ``--enable-lora-bias``); ``lora_bias``,
  PiSSA/OLoRA/CorDA/LoftQ ``init_lora_weights`` (they change the base weights), aLoRA, ``layer_replication``,
  BD-LoRA and QALoRA are refused; a rank above ``--max-lora-rank`` is refused. ``use_rslora`` is supported
  (scaling ``alpha / sqrt(r)``), and so are ``rank_pattern`` / ``alpha_pattern`` in the newer copy.
- ``vllm/config/lora.py`` (commit 01230b40128e570a58e54e75f7e55c4d5cd9246d): ``max_lora_rank`` is one of
  1, 8, 16, 32, 64, 128, 256, 320, 512 and defaults to 16.
- ``vllm/lora/lora_model.py`` (commit 0306474e9d1f26d8717aad457b9511f0c9e57d60) and ``vllm/lora/utils.py``
  (``parse_fine_tuned_lora_name``): tensors are read as ``lora_A.weight`` / ``lora_B.weight`` (linear layers)
  or ``lora_embedding_A`` / ``lora_embedding_B`` (embeddings); DoRA magnitude vectors raise NotImplementedError;
  every adapted module must be one vLLM's implementation of the architecture supports: its linear layers, plus
  ``embed_tokens`` and ``lm_head`` where the model class lists them in ``embedding_modules`` (Llama and Qwen do;
  vLLM pull request 28545 tests LoRA on both with Llama-3.2), else "expected target modules in ... but received ...".

So LoRA on ``lm_head`` is not refused as such (vLLM applies it through its logits processor on the models that
declare the head); whether the architecture supports LoRA at all is vLLM's model table, not checkable here.
An adapter that fails here still works in peftkit and ``peft``; for vLLM, merge it into the base model
(``peftkit merge``) and serve the merged model, or retrain without the option named.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

RANK_CHOICES = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py: MaxLoRARanks
DEFAULT_MAX_RANK = 16  # LoRAConfig.max_lora_rank's default
CLASSIFIER_HEADS = ("classifier", "score")  # the only modules_to_save the newer PEFTHelper accepts
SUPPORTED_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # PEFTHelper._init_is_supported
UNSUPPORTED_FEATURES = {  # adapter_config.json field -> what vLLM calls it when refusing
    "lora_bias": "LoRA bias (lora_bias)",
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "layer_replication": "layer_replication",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "use_qalora": "QALoRA",
}
# parse_fine_tuned_lora_name: the tensor names vLLM reads as LoRA matrices.
LORA_TENSOR = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
EMBEDDING_MODULES = ("embed_tokens", "lm_head")


class VllmCompatibilityWarning(UserWarning):
    """``save_pretrained`` wrote a LoRA adapter that vLLM will refuse to load (the message says why)."""


def max_rank(config: dict[str, Any]) -> int:
    """The largest rank of any adapted module (``r`` or a ``rank_pattern`` override): what vLLM checks."""
    return max([int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def vllm_problems(config: dict[str, Any], tensor_keys: Iterable[str] = ()) -> list[str]:
    """Why vLLM would refuse the adapter with this ``adapter_config.json`` and these tensor names (none: it loads,
    given a ``--max-lora-rank`` at least its rank; see :func:`vllm_notes` for such start-up conditions)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        return [f"vLLM serves LoRA adapters only; this is a {peft_type} adapter"]
    problems = []
    if config.get("use_dora"):
        problems.append("use_dora=true: vLLM does not support DoRA")
    saved = list(config.get("modules_to_save") or [])
    others = [m for m in saved if m not in CLASSIFIER_HEADS]
    if others:
        problems.append(f"modules_to_save={others}: vLLM loads LoRA matrices only, not whole trained modules "
                        f"(it accepts only a classification head: {' or '.join(CLASSIFIER_HEADS)})")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: vLLM does not load trained biases")
    for name, what in UNSUPPORTED_FEATURES.items():
        if config.get(name):
            problems.append(f"{name}={config[name]!r}: vLLM does not support {what}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in SUPPORTED_INITS:
        problems.append(f"init_lora_weights={init!r}: this initialization changes the base weights, which vLLM "
                        "serves unchanged")
    if max_rank(config) > RANK_CHOICES[-1]:
        problems.append(f"rank {max_rank(config)}: vLLM's --max-lora-rank goes up to {RANK_CHOICES[-1]}")
    # Tensors that are neither LoRA matrices nor explained by a problem above (trained biases, whole modules, DoRA).
    trains_bias = config.get("bias", "none") != "none"
    whole = tuple(f".{m}." for m in saved)
    stray = sorted(k for k in tensor_keys if not LORA_TENSOR.search(k) and "lora_magnitude_vector" not in k
                   and not any(w in k for w in whole) and not (trains_bias and k.endswith(".bias")))
    if stray:
        problems.append(f"tensors vLLM does not read as LoRA matrices: {', '.join(stray[:3])}"
                        + (f" and {len(stray) - 3} more" if len(stray) > 3 else ""))
    return problems


def vllm_notes(config: dict[str, Any], tensor_keys: Iterable[str] = ()) -> list[str]:
    """What a LoRA adapter that vLLM accepts needs from the way vLLM is started or from its version."""
    if config.get("peft_type") != "LORA":
        return []
    notes = []
    rank = max_rank(config)
    if DEFAULT_MAX_RANK < rank <= RANK_CHOICES[-1]:
        needed = next(c for c in RANK_CHOICES if c >= rank)
        notes.append(f"rank {rank} > vLLM's default --max-lora-rank {DEFAULT_MAX_RANK}: start it with --max-lora-rank {needed}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        notes.append("rank_pattern/alpha_pattern: honoured by recent vLLM versions only (older ones use r and lora_alpha "
                     "for every module)")
    if any(m in CLASSIFIER_HEADS for m in config.get("modules_to_save") or []):
        notes.append("the classification head (modules_to_save) loads in recent vLLM versions only, for pooling models")
    modules = {k.split(".")[-3] if k.endswith(".weight") else k.split(".")[-2] for k in tensor_keys if LORA_TENSOR.search(k)}
    embedding = sorted(modules & set(EMBEDDING_MODULES))
    if embedding:
        notes.append(f"LoRA on {' and '.join(embedding)}: vLLM loads it only for architectures whose vLLM implementation "
                     "declares these modules (embedding_modules: Llama and Qwen among them)")
    return notes
