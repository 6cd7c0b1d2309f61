"""Training across processes: the accelerator, DeepSpeed's settings, and whole weights and optimizer state out of
(and back into) ZeRO-3 or FSDP2 shards.

The recipe (`train/recipe.py`) runs in one process or many (launched by `accelerate launch` / `torchrun`: DDP, FSDP
or DeepSpeed through accelerate); everything here that depends on how the model is spread over the processes
answers the same call on every process, and the main process gets the whole tensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)


def make_accelerator(grad_accum: int):
    """The `accelerate.Accelerator` of this launch. accelerate's own CPU path (`cpu=True`) only knows DDP; a
    DeepSpeed launch on a machine without a GPU gets the non-CPU path with gloo, which DeepSpeed's CPU accelerator
    runs. An FSDP launch on a machine without a GPU runs as DDP (accelerate runs FSDP only on GPUs): it says so."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    if torch.cuda.is_available():
        accelerator = Accelerator(gradient_accumulation_steps=grad_accum)
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        gloo = InitProcessGroupKwargs(backend="gloo")
        accelerator = Accelerator(cpu=False, gradient_accumulation_steps=grad_accum, kwargs_handlers=[gloo])
    else:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked and accelerator.distributed_type != DistributedType.FSDP and accelerator.is_main_process:
        logger.warning(
            "FSDP was asked for, but accelerate runs FSDP only on GPUs: this run is plain DDP on the CPU "
            "(distributed type %s), every process holding the whole model, its gradients and optimizer state",
            accelerator.distributed_type.value,
        )
    return accelerator


def is_sharded(accelerator) -> bool:
    """Whether the launch shards the model over the processes (DeepSpeed or FSDP), rather than copying it (DDP)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def deepspeed_engine(accelerator, model: torch.nn.Module):
    """The prepared model when it is a DeepSpeed engine (which saves and loads its own sharded state), else None."""
    from accelerate.utils import DistributedType

    return model if accelerator.distributed_type == DistributedType.DEEPSPEED else None


def configure_deepspeed(accelerator, micro_batch_size: int, grad_accum: int, max_grad_norm: float | None) -> None:
    """Under DeepSpeed the recipe's batch, accumulation and clipping settings win over the accelerate file's
    (DeepSpeed's engine applies them itself: it steps only at the accumulation boundary and clips there)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_accumulation_steps=grad_accum,
        train_batch_size=micro_batch_size * grad_accum * accelerator.num_processes,
        gradient_clipping=max_grad_norm or 0.0,
    )


@contextlib.contextmanager
def plain_init(plugin) -> Iterator[None]:
    """Build the model as without DeepSpeed: accelerate announces ZeRO-3 to transformers, which would then create
    the LM's layers already partitioned, and our loader fills its weights itself. ZeRO-3 partitions them in
    `prepare`."""
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def is_zero3(params: Iterable[torch.nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)  # DeepSpeed marks the weights it partitions


def _gathered(params: list[torch.nn.Parameter]):
    """Inside, ZeRO-3-partitioned weights are whole (read-only); other weights are left as they are."""
    if not is_zero3(params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def gather_weights(accelerator, prepared: torch.nn.Module) -> None:
    """Under ZeRO-3 each process holds a shard: put the whole weights into the main process's model (every
    process calls it). Without ZeRO-3 nothing changes."""
    model = accelerator.unwrap_model(prepared)
    if not is_zero3(model.parameters()):
        return
    state = accelerator.get_state_dict(prepared)
    if accelerator.is_main_process:
        for name, param in model.named_parameters():
            param.data = state[name]


def full_trainable_state(model: torch.nn.Module, main: bool) -> dict[str, torch.Tensor]:
    """Whole copies of the trainable weights, on the main process (empty on the others). Every process calls it:
    ZeRO-3 and FSDP2 hold a shard of each weight in every process, gathered here one weight at a time."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            with _gathered([param]):
                whole = param.full_tensor() if isinstance(param, DTensor) else param
                if main:
                    out[name] = whole.detach().to("cpu", copy=True)  # a copy: ZeRO keeps weights in flat buffers
    return out


def load_trainable_state(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy whole weights (`full_trainable_state`'s) into the model; each FSDP2 process keeps its own shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            param = params[name]
            if isinstance(param, DTensor):
                tensor = distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
            param.copy_(tensor)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, main: bool) -> dict | None:
    """The optimizer state on the main process (None on the others). Under FSDP2 each process holds the state of
    its shards: it is gathered into one state keyed by parameter name, as torch.distributed.checkpoint does."""
    if not _is_fsdp2(model):
        return optimizer.state_dict() if main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    return state if main else None


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of `full_optimizer_state`; every process passes the whole state and keeps its part."""
    if not _is_fsdp2(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _is_fsdp2(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
