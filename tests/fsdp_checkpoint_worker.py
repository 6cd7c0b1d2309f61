"""Run by `torchrun --nproc-per-node 2` from test_train_recipe.py: FSDP2 (torch's `fully_shard`, gloo, CPU) with the
recipe's checkpoint helpers (`train/distributed.py`). Trains 2 steps, checkpoints, trains 2 more; a second sharded
model restored from the checkpoint trains the same 2 steps. The main process writes both runs' final weights to
OUT."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import CHECKPOINT
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import fully_shard

from openowl import OwlForConditionalGeneration
from openowl.train.config import OptimSection
from openowl.train.distributed import (
    full_optimizer_state,
    full_trainable_state,
    load_optimizer_state,
    load_trainable_state,
)
from openowl.train.policy import POLICIES, apply_policy
from openowl.train.recipe import make_optimizer


def sharded_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = apply_policy(OwlForConditionalGeneration.from_pretrained(CHECKPOINT), POLICIES["full-llm"]).eval()
    for layer in model.language_model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, make_optimizer(trainable, OptimSection(lr=1e-3, weight_decay=0.1))


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(step * 10 + dist.get_rank())  # each process its own batch
        ids = torch.randint(3, 1000, (2, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    main_process = dist.get_rank() == 0
    model, optimizer = sharded_model()
    train(model, optimizer, range(2))
    weights = full_trainable_state(model, main_process)
    state = full_optimizer_state(model, optimizer, main_process)
    if main_process:
        save_file(weights, out / "trainable.safetensors")
        torch.save(state, out / "optimizer.pt")
        assert state["state"] and all(not k.isdigit() for k in state["state"])  # whole, keyed by parameter name
    dist.barrier()
    train(model, optimizer, range(2, 4))
    uninterrupted = full_trainable_state(model, main_process)

    restored, restored_optimizer = sharded_model()
    load_trainable_state(restored, load_file(out / "trainable.safetensors"))
    load_optimizer_state(restored, restored_optimizer, torch.load(out / "optimizer.pt", weights_only=True))
    train(restored, restored_optimizer, range(2, 4))
    resumed = full_trainable_state(restored, main_process)
    if main_process:
        save_file(uninterrupted, out / "uninterrupted.safetensors")
        save_file(resumed, out / "resumed.safetensors")
    # Leave together: a process that tore its gloo group down while the other was still writing once aborted
    # ("terminate called without an active exception") and took the run down with it.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
