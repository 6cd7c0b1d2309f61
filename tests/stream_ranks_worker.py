"""Run by `torchrun --nproc-per-node 2` from test_train_stream.py: each process reads its micro-batches of a stream of
tar shards (SHARDS, a glob) through a DataLoader with 2 workers, as the recipe does (rank and world from
the recipe's accelerator), and writes the ids of each micro-batch, in order, to OUT/rank-N.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import CHECKPOINT

from openowl import OwlProcessor
from openowl.train.distributed import make_accelerator
from openowl.train.stream import BatchLayout, StreamDataset, StreamSpec, TarShards

if __name__ == "__main__":
    shards, out = sys.argv[1], Path(sys.argv[2])
    state = make_accelerator(grad_accum=1)
    spec = StreamSpec([TarShards(shards)], [1.0], seed=5, shuffle_buffer=16)
    layout = BatchLayout(2, 2, state.process_index, state.num_processes)
    stream = StreamDataset(spec, OwlProcessor.from_pretrained(CHECKPOINT), 160, layout, augment=False)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    batches = [[batch["global_batch"], batch["ids"]] for batch in loader]
    (out / f"rank-{state.process_index}.json").write_text(json.dumps(batches))
