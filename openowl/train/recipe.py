"""The training recipe for both stages: `setup`, `train`, `save_checkpoint`, `resume`, `export`, driven by a
`TrainConfig`.

One process or many (launched by `accelerate launch` / `torchrun`: DDP, FSDP or DeepSpeed through accelerate; the
set-up and the sharded state are `train/distributed.py`'s). Every optimizer step takes one global batch of
`micro_batch_size × grad_accum × world_size` samples: the sampler groups samples by length into global batches,
each then cut into `grad_accum` micro-batches and each of those into one slice per process, and the loss is
normalised by the global batch's number of supervised tokens. So the same global batch size gives the same
samples and the same update (within float rounding, and but for dropout's random draws) however it is split
across processes and accumulation steps.

Checkpoints hold what the run changes (the trainable weights), the optimizer, the scheduler, the RNG states
(`train/rng.py`), the data position and the settings that give all of these their meaning (`run_settings`); they
are written to a temporary folder, fsynced and renamed (`openowl.files`), so a checkpoint folder that exists is
complete. `resume` refuses a config whose settings differ, then continues bit for bit where the checkpoint left
off. At the end of a run the main process draws the loss curve (`train/plot.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from openowl import files
from openowl.model.lora import is_lora_parameter, merge_lora
from openowl.model.owl import OwlForConditionalGeneration, causal_lm_loss
from openowl.processing import OwlProcessor
from openowl.train.config import SCHEDULES, DataSection, ModelSection, OptimSection, TrainConfig, check_config
from openowl.train.data import LengthGroupedSampler, TrainDataset, collate, read_samples
from openowl.train.distributed import (
    configure_deepspeed,
    deepspeed_engine,
    full_optimizer_state,
    full_trainable_state,
    gather_weights,
    is_sharded,
    load_optimizer_state,
    load_trainable_state,
    make_accelerator,
    plain_init,
)
from openowl.train.export import save_adapter
from openowl.train.features import FeatureCache, build_feature_cache, cache_digest, describe
from openowl.train.plot import plot_losses
from openowl.train.policy import PART_ROOTS, POLICIES, apply_policy, backward_parts, store_frozen_linears
from openowl.train.rng import load_rng_state, save_rng_state, seed_everything, state_name
from openowl.train.stream import BatchLayout, StreamDataset, StreamSpec, is_stream, iter_image_bytes, open_source

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "step-"
DEEPSPEED_FOLDER, DEEPSPEED_TAG = "deepspeed", "state"  # DeepSpeed's own files inside a checkpoint
# Settings a resumed run may change: they don't change what the saved state means (where to write, how often to
# log, evaluate or save, how to compute the same thing).
FREE_SETTINGS = (
    "data.dev", "train.output_dir", "train.bf16", "train.gradient_checkpointing", "train.compile",
    "train.log_every", "train.eval_every", "train.save_every", "train.keep_last", "train.num_workers",
)  # fmt: skip


class TrainRecipe:
    """Build everything from a config, train, checkpoint, resume, export."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    # --- setup ---------------------------------------------------------------------------------

    def setup(self, resume: str | Path | None = None) -> None:
        """Build the accelerator, the model with its policy, the data, the optimizer and its schedule; then resume
        from a checkpoint (a folder, or a run folder's newest) when given one."""
        cfg = self.cfg
        check_config(cfg)  # load_config checks too; a config built in code may not have been
        self.accelerator = make_accelerator(cfg.train.grad_accum)
        sharded = is_sharded(self.accelerator)
        if cfg.train.compile and sharded:
            raise ValueError("train.compile works in one process or under DDP, not with DeepSpeed or FSDP")
        if cfg.train.compile and cfg.train.gradient_checkpointing and not _checkpointing_compiles():
            raise ValueError("train.compile with train.gradient_checkpointing needs transformers 5.20 or later: "
                             "earlier ones recompute each layer through its uncompiled forward, so nothing would be "
                             "compiled; drop one of the two, or upgrade transformers")  # fmt: skip
        t = cfg.train
        configure_deepspeed(self.accelerator, t.micro_batch_size, t.grad_accum, cfg.optim.max_grad_norm)
        seed_everything(t.seed)
        self.settings = run_settings(cfg, self.accelerator.num_processes)
        checkpoint = None
        if resume is not None:  # refused before anything loads when the settings differ
            checkpoint = find_checkpoint(Path(resume))
            check_settings(checkpoint, self.settings)
        self._setup_model(sharded)
        self._setup_data()
        if checkpoint is not None:
            check_settings(checkpoint, self.settings)  # now with the samples the data gave
        self._setup_optimizer()
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.out = Path(t.output_dir)
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if checkpoint is not None:
            self.resume(checkpoint)

    def _setup_model(self, sharded: bool) -> None:
        """The model and processor, the policy applied (what trains), frozen bf16 Linears, compiled layers."""
        cfg = self.cfg
        with plain_init(self.accelerator.state.deepspeed_plugin):
            self.model, self.processor = self._load_model()
        self.policy = dataclasses.replace(POLICIES[cfg.policy], lora=cfg.lora)
        apply_policy(self.model, self.policy, gradient_checkpointing=cfg.train.gradient_checkpointing)
        self.bf16_linears: list[str] = []
        if cfg.train.bf16 and not sharded:
            # Frozen Linear weights that bf16 holds exactly are used as they are, not cast at every call (sharding
            # wants one dtype per module, and DeepSpeed manages precision itself).
            self.bf16_linears = store_frozen_linears(self.model, torch.bfloat16)
        if cfg.train.compile:
            compile_layers(self.model)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self._set_train_mode()
        if not self.trainable:
            raise ValueError(f"policy {cfg.policy!r} leaves nothing to train")

    def _setup_data(self) -> None:
        """The training (and dev) data: a file read into memory with its sampler of global batches, or a stream
        (`train/stream.py`); the number of steps."""
        d, t = self.cfg.data, self.cfg.train
        if not d.train and not d.mixture:
            raise ValueError("no training data: set data.train (a jsonl file, tar shards, Parquet, a dataset) or "
                             "data.mixture")  # fmt: skip
        if is_stream(d.train, d.mixture):
            self._setup_stream()
            return
        samples = read_samples(d.train, image_root=d.image_root, format=d.format)
        self.dataset = TrainDataset(samples, self.processor, d.max_length, train=True, seed=t.seed,
                                    check_images=d.image_check, augment=d.augment,
                                    features=self._feature_cache())  # fmt: skip
        if len(self.dataset) == 0:
            raise ValueError(f"{d.train}: no usable training sample ({self.dataset.report()})")
        self._setup_dev()
        world = self.accelerator.num_processes
        self.global_batch = t.micro_batch_size * t.grad_accum * world
        short = len(self.dataset) % self.global_batch
        # A short last batch could leave a process, or a micro-batch, without samples: dropped then.
        self.sampler = LengthGroupedSampler(self.dataset.lengths, self.global_batch, seed=t.seed,
                                            drop_last=world > 1 or 0 < short < t.grad_accum)  # fmt: skip
        if self.sampler.num_batches == 0:
            raise ValueError(f"{d.train}: {len(self.dataset)} usable samples don't fill one global batch of "
                             f"{self.global_batch} (micro_batch_size × grad_accum × {world} processes)")  # fmt: skip
        self.steps_per_epoch = self.sampler.num_batches  # one global batch per optimizer step
        self.total_steps = t.max_steps or self.steps_per_epoch * t.epochs
        self.settings["data.samples"] = _samples_digest(self.dataset)

    def _setup_dev(self) -> None:
        d = self.cfg.data
        self.dev = None
        if d.dev:
            dev_samples = read_samples(d.dev, image_root=d.image_root, format=d.format)
            self.dev = TrainDataset(dev_samples, self.processor, d.max_length, train=False, check_images=d.image_check)

    def _setup_stream(self) -> None:
        """A streamed `data.train` (or `data.mixture`): nothing is read before the first step, so the run's length
        comes from `train.max_steps`."""
        d, t, acc = self.cfg.data, self.cfg.train, self.accelerator
        if not t.max_steps:
            raise ValueError(f"{d.train or 'data.mixture'}: a stream needs train.max_steps (its length is not known "
                             "before it is read, and nothing is read up front)")  # fmt: skip
        spec = stream_spec(d, t.seed)
        layout = BatchLayout(t.micro_batch_size, t.grad_accum, acc.process_index, acc.num_processes)
        self.dataset = StreamDataset(spec, self.processor, d.max_length, layout, d.augment, self._feature_cache())
        self._setup_dev()
        self.global_batch = layout.global_batch
        self.steps_per_epoch, self.total_steps = None, t.max_steps
        self.settings["data.samples"] = spec.digest()

    def _setup_optimizer(self) -> None:
        """The optimizer and its schedule, and the model and optimizer prepared by the accelerator."""
        o = self.cfg.optim
        self.optimizer = make_optimizer(list(self.trainable.values()), o)
        self.scheduler = _schedule(self.optimizer, o.schedule, o.warmup_steps, self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        # Sharding (FSDP) may have replaced the parameters: clip what the optimizer now holds.
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}

    def _load_model(self) -> tuple[OwlForConditionalGeneration, OwlProcessor]:
        return load_model(self.cfg.model)

    def _feature_cache(self) -> FeatureCache | None:
        """The frozen ViT's cached outputs that `data.features` names, checked against this model and processor;
        None without one (images are then encoded on the fly). Where a cache would be wrong, `setup`'s
        `check_config` has refused it already."""
        d = self.cfg.data
        return FeatureCache(d.features, self.model, self.processor) if d.features else None

    # --- the loop ------------------------------------------------------------------------------

    def train(self) -> dict:
        """Run to `total_steps`; returns the last logged metrics."""
        from tqdm import tqdm

        cfg, acc = self.cfg, self.accelerator
        writer = _tensorboard(self.out, self.step) if acc.is_main_process else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", disable=not acc.is_main_process)
        batches = self._batches()
        last: dict = {}
        while self.step < self.total_steps:
            started = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]
            loss, tokens = self._optimizer_step(micro)
            self.step += 1
            metrics = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                       "tokens_per_s": tokens / (time.perf_counter() - started), "epoch": self.epoch}  # fmt: skip
            if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                self._log(metrics, writer)
            if self.dev is not None and cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                self._log({"step": self.step, "dev_loss": self.evaluate()}, writer)
            if cfg.train.save_every and self.step % cfg.train.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update(1)
            last = metrics
        bar.close()
        last["data"] = self._data_summary()
        if self.dev is not None:
            last["dev_loss"] = self.evaluate()
            self._log({"step": self.step, "dev_loss": last["dev_loss"]}, writer)
        self.save_checkpoint()
        if writer is not None:
            writer.close()
        if acc.is_main_process:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
            if self.dataset.skipped or self.dataset.answers_cut:
                logger.warning("training data: %s", self.dataset.report())
        return last

    def _data_summary(self) -> dict:
        """The dataset's counts (`TrainDataset.summary`), with the samples whose images failed to load in any
        process. Every process calls it."""
        from accelerate.utils import gather_object

        for failed in gather_object([self.dataset.failed]):
            self.dataset.add_failed(failed)
        return self.dataset.summary()

    def _stream_batches(self):
        """Endless micro-batches of a stream for this process, continuing from (epoch, batch_in_epoch), decoded in
        `train.num_workers` DataLoader workers (the batches and their order don't depend on how many)."""
        while True:
            self.dataset.set_position(self.epoch, self.batch_in_epoch)
            loader = self._loader(batch_size=None)
            for micro in loader:
                self.batch_in_epoch = micro.pop("global_batch") + 1
                self.dataset.note(micro)
                yield micro
            if self.batch_in_epoch == 0:
                raise ValueError(f"{self.dataset.spec.sources[0].name}: the stream holds fewer samples than one global "
                                 f"batch of {self.global_batch}")  # fmt: skip
            self.epoch += 1
            self.batch_in_epoch = 0

    def _batches(self):
        """Endless micro-batches for this process, continuing from (epoch, batch_in_epoch): each global batch of
        the sampler (one optimizer step; `batch_in_epoch` counts them) cut into `grad_accum` micro-batches, each
        cut into one slice per process; loaded (images decoded) in `train.num_workers` DataLoader workers."""
        if isinstance(self.dataset, StreamDataset):
            yield from self._stream_batches()
            return
        acc, per, accum = self.accelerator, self.cfg.train.micro_batch_size, self.cfg.train.grad_accum
        while True:
            self.sampler.set_epoch(self.epoch)
            self.dataset.set_epoch(self.epoch)
            parts = [
                (index, part.tolist()[acc.process_index * per : (acc.process_index + 1) * per])
                for index, global_batch in enumerate(self.sampler.batches(self.epoch))
                if index >= self.batch_in_epoch
                for part in torch.tensor(global_batch).tensor_split(accum)
            ]  # a short last batch: near-equal parts
            loader = self._loader(batch_sampler=[mine for _, mine in parts], collate_fn=self._collate)
            for (index, _), batch in zip(parts, loader, strict=True):
                self.batch_in_epoch = index + 1
                self.dataset.add_failed(batch.pop("failed"))  # images that failed to load in a worker
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def _loader(self, **kwargs) -> torch.utils.data.DataLoader:
        """A DataLoader over the training data with `train.num_workers` workers and a generator of its own: a
        loader draws its workers' base seed from it, which would otherwise be a draw from the global RNG, and a
        resumed run (its loader made at another step) would then get other dropout masks."""
        generator = torch.Generator().manual_seed(self.epoch)
        return torch.utils.data.DataLoader(self.dataset, num_workers=self.cfg.train.num_workers, generator=generator,
                                           **kwargs)  # fmt: skip

    def _collate(self, items: list[dict]) -> dict:
        """`collate`, and the samples whose images failed to load (`failed`: id -> why) noted beside it."""
        batch = collate(items, self.processor.tokenizer.pad_token_id)
        batch["failed"] = {item["id"]: item["failed"] for item in items if "failed" in item}
        return batch

    def _optimizer_step(self, micro: list[dict]) -> tuple[float, int]:
        acc = self.accelerator
        local = torch.tensor(sum(int((b["labels"][:, 1:] >= 0).sum()) for b in micro), device=acc.device)
        total = acc.reduce(local.clone(), reduction="sum")  # supervised tokens in the global batch
        loss_sum = torch.zeros((), device=acc.device)
        for batch in micro:  # gradients are synchronised (and DeepSpeed steps) on the last micro-batch only
            with acc.accumulate(self.model), self._autocast():
                summed = self._loss_sum(batch)
                # Processes average gradients and backward divides by the accumulation steps: scale both away so
                # that the update is the mean over the global batch's supervised tokens.
                acc.backward(summed * acc.num_processes * acc.gradient_accumulation_steps / total.clamp(min=1))
            loss_sum += summed.detach()
        if self.cfg.optim.max_grad_norm:
            acc.clip_grad_norm_(list(self.trainable.values()), self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = acc.reduce(loss_sum, reduction="sum") / total.clamp(min=1)
        tokens = int(acc.reduce(torch.tensor(sum(b["input_ids"].numel() for b in micro), device=acc.device), "sum"))
        return float(loss), tokens

    def _loss_sum(self, batch: dict) -> torch.Tensor:
        """Summed next-token loss of a micro-batch, its images given as pixels or as cached ViT outputs
        (`vision_tokens`). A batch without images still runs the trainable visual parts on a dummy image (times 0),
        so every process touches the same parameters and DDP never waits forever."""
        model = self.accelerator.unwrap_model(self.model)
        device = self.accelerator.device
        pixels, tokens = batch.get("pixel_values"), batch.get("vision_tokens")
        out = self.model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            pixel_values=None if pixels is None else pixels.to(device),
            vision_tokens=None if tokens is None else tokens.to(device),
            use_cache=False,  # no KV cache to fill: nothing generates from this forward
        )
        summed = causal_lm_loss(out.logits, batch["labels"].to(out.logits.device), reduction="sum")
        no_images = pixels is None and tokens is None
        if no_images and (self.policy.vision != "frozen" or self.policy.abstractor != "frozen"):
            size = model.config.vision.image_size
            dummy = torch.zeros(1, 3, size, size, device=self.accelerator.device)
            summed = summed + 0.0 * model.get_image_features(dummy).sum()
        return summed

    def _set_train_mode(self) -> None:
        """Train mode, except for frozen parts that come before every trained part: no gradient reaches them, so
        dropout there would only add noise (and make a run depend on how its batch is split). Frozen parts that
        backward runs through (the LLM in stage 1) stay in train mode, which keeps their gradient checkpointing.
        Upstream left every part in train mode."""
        model = self.accelerator.unwrap_model(self.model)
        model.train()
        for part, roots in PART_ROOTS.items():
            if part not in backward_parts(self.policy):
                for root in roots:
                    module = getattr(model, root, None)
                    if isinstance(module, torch.nn.Module):
                        module.eval()

    def _autocast(self):
        enabled = self.cfg.train.bf16
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the dev set."""
        self.model.eval()
        total, count = 0.0, 0
        per = self.cfg.train.micro_batch_size
        for start in range(0, len(self.dev), per):
            batch = collate([self.dev[i] for i in range(start, min(start + per, len(self.dev)))],
                            self.processor.tokenizer.pad_token_id)  # fmt: skip
            with self._autocast():
                total += float(self._loss_sum(batch))
            count += int((batch["labels"][:, 1:] >= 0).sum())
        self._set_train_mode()
        return total / max(count, 1)

    def _log(self, metrics: dict, writer) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if writer is not None:
            for key, value in metrics.items():
                if key != "step":
                    writer.add_scalar(key, value, metrics["step"])

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write `step-NNNNNN/` atomically; keep the last `keep_last`. Every process calls it (DeepSpeed's ZeRO
        shards the optimizer state, and ZeRO-3 the weights, over the processes). Returns the folder on the main
        process, None on the others."""
        acc = self.accelerator
        final = self.out / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        tmp = self.out / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.model)
        trainable = full_trainable_state(model, acc.is_main_process)
        engine = deepspeed_engine(self.accelerator, self.model)
        if engine is not None:  # each process writes its shard of the optimizer state
            engine.save_checkpoint(str(tmp / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        else:
            optimizer = full_optimizer_state(model, self.optimizer.optimizer, acc.is_main_process)
        save_rng_state(tmp, self._rng_name())  # each process draws its own dropout masks
        streamed = isinstance(self.dataset, StreamDataset)
        if streamed:  # every process's skipped samples, gathered into the main process's report
            self._data_summary()
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        save_file(trainable, tmp / "trainable.safetensors")
        if engine is None:
            torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "settings": self.settings, **({"stream": self.dataset.state()} if streamed else {})}  # fmt: skip
        (tmp / "state.json").write_text(json.dumps(state) + "\n")
        for path in sorted(tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # files, then their folders
            files.fsync(path)
        if final.exists():
            shutil.rmtree(final)
        files.replace(tmp, final)
        for old in checkpoints(self.out)[: -self.cfg.train.keep_last or None]:
            shutil.rmtree(old)
        return final

    def _rng_name(self) -> str:
        return state_name(self.accelerator.process_index, self.accelerator.num_processes)

    def resume(self, path: str | Path) -> None:
        """Restore weights, optimizer, scheduler, RNG and data position from a checkpoint folder, or from the
        newest complete checkpoint of an output folder, after checking that it was written under this run's
        settings (`check_settings`). Logged steps after the checkpoint's are dropped from `metrics.jsonl` (they
        are trained again)."""
        path = find_checkpoint(Path(path))
        check_settings(path, self.settings)
        model = self.accelerator.unwrap_model(self.model)
        saved = load_file(path / "trainable.safetensors")
        mine = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if saved.keys() != mine.keys():
            raise ValueError(f"{path}: its trainable tensors don't match this config's policy ({self.cfg.policy})")
        engine = deepspeed_engine(self.accelerator, self.model)
        if engine is not None:  # weights (fp32 master copies included) and this process's optimizer shard
            if not (path / DEEPSPEED_FOLDER).is_dir():
                raise ValueError(f"{path}: not written by a DeepSpeed run, which keeps its optimizer state sharded")
            engine.load_checkpoint(str(path / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG, load_module_strict=False,
                                   load_lr_scheduler_states=False)  # fmt: skip
        else:
            if not (path / "optimizer.pt").is_file():
                raise ValueError(f"{path}: written by a DeepSpeed run; resume it under DeepSpeed")
            load_trainable_state(model, saved)
            optimizer = torch.load(path / "optimizer.pt", weights_only=True)
            load_optimizer_state(model, self.optimizer.optimizer, optimizer)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        load_rng_state(path, self._rng_name())
        state = json.loads((path / "state.json").read_text())
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if self.accelerator.is_main_process and "stream" in state:  # the skips so far, of every process
            self.dataset.load_state(state["stream"])
        if self.accelerator.is_main_process:
            _drop_logged_after(self.out / "metrics.jsonl", self.step)
            print(f"resuming from {path} at step {self.step} of {self.total_steps}", file=sys.stderr, flush=True)

    def export(self, folder: str | Path) -> Path | None:
        """The trained model as a normal checkpoint folder (LoRA merged), loadable by `from_pretrained`. Every
        process calls it; the main process writes it and returns the folder."""
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        gather_weights(acc, self.model)  # ZeRO-3's shards, whole in the main process's model
        if not acc.is_main_process:
            return None
        for name in self.bf16_linears:  # back to the model's dtype (losslessly) before LoRA is merged into them
            model.get_submodule(name).to(getattr(torch, self.cfg.model.dtype))
        folder = Path(folder)
        if self.policy.language_model == "lora" or "lora" in (self.policy.vision, self.policy.abstractor):
            # Parts trained in full go with the LoRA weights (stage2-abstractor's abstractor): base + adapter is
            # then the trained model, not the base with only its LoRA changed.
            full = {n: p for n, p in model.named_parameters() if p.requires_grad and not is_lora_parameter(n)}
            save_adapter(model, folder / "adapter", base_model=self.cfg.model.path or self.cfg.model.preset, full=full)
            model = merge_lora(model)
        model.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        return folder


def run_training(cfg: TrainConfig, resume: str | Path | None = None) -> dict | None:
    """The `openowl train` job: set up (resuming when `resume` is given: a checkpoint or run folder, or "" for the
    newest checkpoint of the run's own output folder), train, export to `output_dir/final`.

    Every process calls it. Returns the last metrics with the exported folder (`model`) on the main process, None
    on the others.
    """
    recipe = TrainRecipe(cfg)
    if resume is not None:
        resume = resume or cfg.train.output_dir
    recipe.setup(resume=resume)
    metrics = recipe.train()
    folder = recipe.export(Path(cfg.train.output_dir) / "final")  # every process takes part, the main one writes
    # Every process waits for the export, then leaves the process group: a process that exits while the group's
    # threads run can abort (seen under DeepSpeed ZeRO-3 on gloo) and fail the whole launch.
    recipe.accelerator.wait_for_everyone()
    recipe.accelerator.end_training()
    return None if folder is None else {**metrics, "model": str(folder)}


def run_feature_cache(cfg: TrainConfig) -> dict:
    """The `openowl data cache-features` job: run the config's frozen ViT once over every training image and store
    its outputs in `data.features` (`train/features.py`), for training with `data.features` set.

    Refused (before the model loads) where a cache would be wrong (`check_config`, `check_cacheable`). Under
    `accelerate launch` each process computes its share of the shards (rank = accelerate's process index), on its
    device.

    Returns:
        `build_feature_cache`'s counts, with the missing image files among the skipped, and `line`, a summary.
    """
    d = cfg.data
    if not d.features:
        raise ValueError("data.features is not set: give the folder to write the feature cache into")
    check_config(cfg)  # refuses a cache where it would be wrong (`check_cacheable`), before the model loads
    state = make_accelerator(grad_accum=1)  # as training's: on a CPU, accelerate's own state sees one process
    model, processor = load_model(cfg.model)
    model.vision_model.to(state.device)
    missing: list[str] = []
    summary = build_feature_cache(model, processor, _cache_images(d, missing), d.features,
                                  rank=state.process_index, world=state.num_processes)  # fmt: skip
    summary["skipped"] += len(missing)
    summary["skipped_names"] = (missing + summary["skipped_names"])[:5]
    rank = f" (process {state.process_index} of {state.num_processes})" if state.num_processes > 1 else ""
    return {**summary, "line": describe(summary, d.features) + rank}


def stream_spec(d: DataSection, seed: int) -> StreamSpec:
    """The stream a streamed `data` section names: `data.train`, or each source of `data.mixture` with its weight."""
    entries = [(m.path, m.weight, m.repeat) for m in d.mixture] or [(d.train, 1.0, 1)]
    sources = [open_source(path, d.image_root, d.split) for path, _, _ in entries]
    weights, repeats = [w for _, w, _ in entries], [r for _, _, r in entries]
    return StreamSpec(sources, weights, seed=seed, shuffle_buffer=d.shuffle_buffer, format=d.format, repeats=repeats)


def _cache_images(d: DataSection, missing: list[str]):
    """`(path, bytes)` of every image the training data names, in sample order (a stream's: its first epoch's
    order); missing files are appended to `missing`."""
    if is_stream(d.train, d.mixture):
        yield from iter_image_bytes(stream_spec(d, seed=0), missing)
        return
    for sample in read_samples(d.train, image_root=d.image_root, format=d.format):
        for path in sample.images:
            try:
                yield str(path), path.read_bytes()
            except OSError as err:
                missing.append(f"{path} ({err.strerror or err})")


def load_model(m: ModelSection) -> tuple[OwlForConditionalGeneration, OwlProcessor]:
    """The model (in train mode) and processor a config's `model` section names: a checkpoint (`path`, with its
    own processor or `tokenizer`'s), or a fresh model of a named shape (`preset`, with `tokenizer`)."""
    if m.path:
        model = OwlForConditionalGeneration.from_pretrained(m.path, dtype=m.dtype)
        processor = OwlProcessor.from_pretrained(m.tokenizer or m.path)
    elif m.preset:
        from openowl.config import get_preset

        if not m.tokenizer:
            raise ValueError("model.preset needs model.tokenizer (a folder with the tokenizer files)")
        model = OwlForConditionalGeneration(get_preset(m.preset)).to(getattr(torch, m.dtype))
        processor = OwlProcessor.from_pretrained(m.tokenizer)
        processor.image_size = model.config.vision.image_size
    else:
        raise ValueError("set model.path (a checkpoint) or model.preset (a fresh model)")
    return model.train(), processor


def _checkpointing_compiles() -> bool:
    """Whether this transformers' checkpointed layers run their compiled forward (5.20 on, the versions that name it
    `activation_checkpointing`; under 5.19 dynamo captured no graph of a checkpointed layer)."""
    from transformers import PreTrainedModel

    return hasattr(PreTrainedModel, "activation_checkpointing_enable")


def compile_layers(model: torch.nn.Module) -> int:
    """Compile, in place, each layer of every stack of layers (the ViT's, the abstractor's, the LLM's decoder
    layers) with `torch.compile`; returns how many.

    Per layer rather than whole-model: the layers of a stack share one compiled graph, so compiling costs about as
    much for 24 layers as for one, and parameter names (checkpoints, the optimizer) stay as they are. Inductor fuses
    what lies between the matrix products (norms, activations, residual adds, autocast's casts and their
    gradients). Batches of a new length recompile once; after that the sequence length is a dynamic dimension.
    """
    layers = [layer for stack in model.modules() if isinstance(stack, torch.nn.ModuleList) for layer in stack]
    for layer in layers:
        layer.compile()
    return len(layers)


def make_optimizer(trainable: list[torch.nn.Parameter], o: OptimSection) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, fused: one pass over each tensor, where the default per-tensor
    loop re-reads the weights and both moments for every elementwise op (docs/performance.md)."""
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # DeepSpeed drops empty groups, which the scheduler counts
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)


def run_settings(cfg: TrainConfig, num_processes: int) -> dict:
    """The settings a checkpoint's state means something under, flat (`train.micro_batch_size`): every config
    value but `FREE_SETTINGS`, the training file and the feature cache by their content (sha256: they may move)
    and the number of processes. The recipe adds `data.samples`, a digest of the samples the data gave."""
    flat: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(cfg.to_dict(), "")
    for key in FREE_SETTINGS:
        flat.pop(key)
    train = Path(cfg.data.train)
    flat["data.train"] = f"sha256:{files.sha256(train)}" if train.is_file() else str(train)
    if cfg.data.features:  # the cached ViT outputs trained on, by their manifest (ViT, transform, shards)
        flat["data.features"] = cache_digest(cfg.data.features)
    flat["processes"] = num_processes
    return json.loads(json.dumps(flat))  # tuples as lists, as they are read back


def check_settings(checkpoint: Path, settings: dict) -> None:
    """Refuse to resume from a checkpoint written under other settings (`run_settings`).

    Raises:
        ValueError: naming each setting that differs, with the checkpoint's value and this run's.
    """
    saved = json.loads((checkpoint / "state.json").read_text()).get("settings")
    if saved is None:
        raise ValueError(f"{checkpoint}: written by an older openowl, without the settings it was trained under; "
                         "it can't be checked against this config, so it is not resumed")  # fmt: skip
    differ = [key for key in settings if key in saved and saved[key] != settings[key]]
    differ += [key for key in saved if key not in settings and key != "data.samples"]
    if differ:
        shown = "; ".join(f"{key}: checkpoint {saved.get(key)!r}, now {settings.get(key)!r}" for key in differ)
        raise ValueError(
            f"{checkpoint}: can't resume, these settings differ from the run that wrote it: {shown}. Resume with the "
            "checkpoint's settings, or start a new run (another train.output_dir)"
        )


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder itself, or the newest complete checkpoint of a run folder."""
    if (path / "state.json").is_file():
        return path
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: no complete checkpoint (step-* folder) to resume from")
    return found[-1]


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first (temporary `.tmp-*` folders are never complete)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def _schedule(optimizer, kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r} (cosine, linear or constant)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _samples_digest(dataset: TrainDataset) -> str:
    """A digest of the samples a dataset kept (ids and lengths): the sampler's batches follow from them."""
    text = json.dumps([dataset.ids, dataset.lengths])
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _drop_logged_after(metrics: Path, step: int) -> None:
    """Remove the rows of steps after `step` from a metrics log (a resumed run logs them again)."""
    if not metrics.is_file():
        return
    lines = metrics.read_text().splitlines()
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) < len(lines):
        files.atomic_write_text(metrics, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    """A metrics row's step; infinite for a row a killed run left half-written (it is dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def _tensorboard(folder: Path, step: int = 0):
    """TensorBoard's writer; a resumed run (at `step`) purges the events of later steps, which it logs again."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: the jsonl log is enough
        return None
    return SummaryWriter(str(folder / "tensorboard"), purge_step=step + 1 if step else None)
