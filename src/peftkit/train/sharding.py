"""Sharded training with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): each of N processes keeps
1/N of every weight, the frozen base's included, and the optimizer state only of its 1/N of the trained
ones. A layer's weights are gathered just before it runs and freed right after.

    shard_model(model, device)     wraps each transformer block, then the whole model (before the optimizer)
    local_shards(tensors)          this process's pieces, for a sharded checkpoint (one file per process)
    restore_shards(params, saved)  the pieces of a checkpoint back into the sharded parameters
    gather_for_saving(model, ...)  the adapter's (or whole model's) tensors gathered whole, for the final save

The saved adapter is gathered from every process (``peft`` users lost adapters here: ZeRO-3 saving
empty tensors, peft #2892; FSDP2 ``adapter_only`` saving only rank 0's shard, accelerate #4206), so it
is the same file a single-process run writes. peftkit calls ``fully_shard`` itself instead of
Accelerate's FSDP plugin because the plugin only runs on GPUs (Accelerate turns FSDP off for CPU
processes), and one code path should run in the tests on a CPU and on the GPUs.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import nn

__all__ = ["Sharding", "gather_for_saving", "local_shards", "parameter_bytes", "resolve_sharding", "restore_shards",
           "shard_model", "whole"]

Sharding = Literal["none", "fsdp"]


def resolve_sharding(requested: Sharding, world: int, method: str, has_steering: bool, quantized: bool = False) -> Sharding:
    """``requested``, or ``fsdp`` when the run was started with an Accelerate FSDP config; refuses what
    cannot be sharded with a message that says what to do."""
    from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if from_launcher and requested == "none":
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ValueError(f"The accelerate config asks for FSDP version {version}; peftkit shards with FSDP2: set "
                             "fsdp_version: 2 (configs/accelerate/fsdp.yaml does), or pass --sharding fsdp with a plain multi-GPU config.")
        _check_launcher_settings()
        requested = "fsdp"
    if requested == "none":
        return "none"
    if world < 2:
        raise ValueError("--sharding fsdp splits the model between several processes, and this run has one: launch it with "
                         "torchrun --nproc_per_node N -m peftkit.cli train ... or accelerate launch --config_file "
                         "configs/accelerate/fsdp.yaml -m peftkit.cli train ... (or drop --sharding).")
    if quantized:
        raise ValueError("--sharding fsdp with --quantize: the quantized base's 4/8-bit weights cannot be split between "
                         "processes here; use one of the two (a quantized base per process is DDP: drop --sharding).")
    if has_steering:
        raise ValueError(f"--sharding fsdp: {method} moves rank between layers from whole gradients, which sharding "
                         "splits between processes; train it without --sharding (DDP) or pick lora.")
    return "fsdp"


def _check_launcher_settings() -> None:
    """The FSDP settings of an Accelerate config (which ``accelerate launch`` passes as ``FSDP_*`` variables)
    that peftkit would not follow are refused rather than ignored. Followed: ``fsdp_version`` (2),
    ``fsdp_reshard_after_forward``; peftkit's own choices: transformer blocks as units, whole tensors in
    the saved result and per-process pieces in checkpoints (whatever ``fsdp_state_dict_type`` says)."""
    refused = {
        "FSDP_OFFLOAD_PARAMS": ("true", "fsdp_offload_params: true (peftkit keeps the shards on the device); set it to false"),
        "FSDP_CPU_RAM_EFFICIENT_LOADING": ("true", "fsdp_cpu_ram_efficient_loading: true (transformers would then load the "
                                           "weights in the first process only; peftkit loads them in each, then shards); set it to false"),
        "FSDP_ACTIVATION_CHECKPOINTING": ("true", "fsdp_activation_checkpointing: true; set it to false and pass "
                                          "--gradient-checkpointing to peftkit instead"),
    }
    for variable, (value, what) in refused.items():
        if os.environ.get(variable, "").lower() == value:
            raise ValueError(f"The accelerate config sets {what}.")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        raise ValueError(f"The accelerate config sets fsdp_auto_wrap_policy: {policy}; peftkit shards transformer block "
                         "by transformer block: set TRANSFORMER_BASED_WRAP (configs/accelerate/fsdp.yaml does).")


def shard_model(model: nn.Module, device: torch.device, world: int) -> None:
    """Shard ``model`` in place: every transformer block (the classes transformers never splits between
    devices, ``_no_split_modules``) is one unit, gathered for its own forward and backward; the rest
    (embeddings, final norm, output head, soft prompts) is the root unit. Call before creating the optimizer:
    sharding replaces every parameter by a DTensor holding this process's piece."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .loss import transformers_model

    mesh = init_device_mesh(device.type, (world,))
    blocks = set(getattr(transformers_model(model), "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        raise ValueError(f"--sharding fsdp: {type(transformers_model(model)).__name__} names no transformer block class "
                         "(_no_split_modules), so there is nothing to shard layer by layer.")
    # Free each block's gathered weights after its forward (gather again for the backward): the memory
    # saving FSDP is for. An Accelerate config may turn this off (fsdp_reshard_after_forward: false).
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh)
    _refresh_in_place_tuners(model)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered from every process (every process must call this); others as they are."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_shards(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This process's piece of each sharded tensor (plain tensors, for safetensors); others unchanged."""
    return {name: t.to_local() if is_sharded(t) else t for name, t in tensors.items()}


def restore_shards(like: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """``saved`` (a piece written by :func:`local_shards`) as a tensor sharded like ``like``."""
    if not is_sharded(like) or saved.dim() == 0:
        return saved
    from torch.distributed.tensor import DTensor

    local = like.to_local()
    if saved.shape != local.shape:
        raise ValueError(f"a checkpoint piece has shape {tuple(saved.shape)}, this process holds {tuple(local.shape)}; "
                         "resume with the same number of processes and the same model.")
    return DTensor.from_local(saved.to(local.device, local.dtype), like.device_mesh, like.placements,
                              run_check=False, shape=like.shape, stride=like.stride())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this process holds: the whole model unsharded, about 1/N of it sharded N ways."""
    return sum(p.numel() * p.element_size() for p in local_shards(dict(model.named_parameters())).values())


def gather_for_saving(model: nn.Module, whole_model: bool) -> dict[str, torch.Tensor]:
    """What the final save writes, gathered whole from every process (every process must call this, and
    gets the same tensors): the active adapter's tensors keyed as in ``adapter_model.safetensors``, or with
    ``whole_model`` the state dict of the trained transformers model (full fine-tuning)."""
    from .loss import transformers_model

    tensors = transformers_model(model).state_dict() if whole_model else model.tuner().state_dict()
    return {name: whole(t).detach().cpu() for name, t in tensors.items()}


def _refresh_in_place_tuners(model: nn.Module) -> None:
    """Methods that train the base's own parameters (full, selective) keep them by name in ``tuner.params``;
    sharding replaced those parameters, so point the tuners at the sharded ones (and let the originals go)."""
    for name in getattr(model, "peft_config", {}):
        tuner = model.tuner(name)
        if isinstance(getattr(tuner, "params", None), dict):
            current = dict(tuner.model.named_parameters())
            tuner.params = {n: current[n] for n in tuner.params}
