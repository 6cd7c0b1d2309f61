"""Continuous batching: one thread owns the model and runs the generation steps of every request in flight.

Each step: drop the rows of requests whose client left, admit waiting requests while the batch has room (prefilled
together, left-padded, one chunk of at most `prefill_chunk` prompt tokens per step, their rows joining the running
batch once their prompts are in), then feed every row its last token for one decoding step and sample each row's
next token with its own parameters and its own random stream. A long prompt thus delays the running rows by about
one chunk per step, never by its whole prefill. Requests join and
leave between steps, so a short answer never waits for a long one. Text goes back token by token through each
request's `emit` callback; detokenization and stop strings are the engine's `Detokenizer`.

A row computes what `Engine.generate` computes for its request alone: positions come from the attention mask, and a
seeded row draws from its own generator seeded as the engine seeds it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from openowl.infer.engine import Detokenizer, Engine
from openowl.infer.sampling import SamplingParams, sample_next
from openowl.processing import ImageInput
from openowl.serve.batch import Prefill, RunningBatch

logger = logging.getLogger(__name__)


# --- what goes back to the caller ----------------------------------------------------------------


@dataclass(frozen=True)
class Delta:
    choice: int
    text: str


@dataclass(frozen=True)
class Finished:
    choice: int
    reason: str  # "stop" (EOS or a stop string) or "length"
    completion_tokens: int  # tokens generated, the EOS included


@dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Finished | Failed


class QueueFullError(Exception):
    """The waiting queue is at its limit; the caller should retry later."""


@dataclass(eq=False)
class Job:
    """One request: prompt ids (placeholders included), its media in order, one `SamplingParams` per choice.

    `emit` is called from the scheduler thread with each `Event`. `cancel()` may be called from any thread: the
    job's rows are dropped before the next step (or it is never admitted).
    """

    prompt_ids: list[int]
    params: list[SamplingParams]
    emit: Callable[[Event], None]
    images: Sequence[ImageInput] = ()
    videos: Sequence[Sequence[ImageInput]] = ()
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    """One choice of one job in the running batch."""

    job: Job
    choice: int
    params: SamplingParams
    detok: Detokenizer
    generator: torch.Generator
    history: list[int]  # prompt text ids and generated ids, for the repetition controls
    sampling: SamplingParams  # `params` less what doesn't change the draw (rows that sample alike share a call)
    token: int = -1  # the last sampled token, fed at the next step
    generated: int = 0
    done: bool = False

    def take(self, token: int) -> None:
        """Record the sampled token and emit its text; finish on EOS, a stop string or the token budget."""
        self.token = token
        self.generated += 1
        if self.params.repetition_penalty != 1.0 or self.params.no_repeat_ngram_size:
            self.history.append(token)
        text = self.detok.add(token)
        if not self.detok.finish_reason and self.generated == self.params.max_new_tokens:
            text += self.detok.finish()
        if text:
            self.job.emit(Delta(self.choice, text))
        if self.detok.finish_reason:
            self.done = True
            self.job.emit(Finished(self.choice, self.detok.finish_reason, self.generated))


# --- numbers for the metrics endpoint ------------------------------------------------------------


@dataclass
class Stats:
    admitted: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    recent: deque = field(default_factory=deque, repr=False)  # (time, tokens) of each step in the last `window` seconds
    window: float = 10.0

    def record(self, tokens: int) -> None:
        now = time.monotonic()
        self.generated_tokens += tokens
        self.recent.append((now, tokens))
        while self.recent and self.recent[0][0] < now - self.window:
            self.recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `window` seconds."""
        now = time.monotonic()
        return sum(n for t, n in list(self.recent) if t >= now - self.window) / self.window


# --- the scheduler -------------------------------------------------------------------------------


class Scheduler:
    """Owns the engine's model in one background thread; `submit` jobs from any thread."""

    def __init__(self, engine: Engine, max_batch_size: int = 8, max_queue: int = 32, prefill_chunk: int = 256):
        if min(max_batch_size, max_queue, prefill_chunk) < 1:
            raise ValueError(f"need max_batch_size, max_queue and prefill_chunk ≥ 1, got {max_batch_size}, "
                             f"{max_queue}, {prefill_chunk}")  # fmt: skip
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk  # prompt tokens (padding included) per step
        self.stats = Stats()
        self.batch = RunningBatch(engine.model)
        self.rows: list[_Row] = []
        self.prefilling: tuple[list[Job], Prefill] | None = None  # admitted jobs whose prompts are going in
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="openowl-scheduler", daemon=True)

    # --- the caller's side ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Rows being decoded (a request with `n` choices has `n` rows)."""
        return len(self.rows)

    def submit(self, job: Job) -> None:
        """Queue a job.

        Raises:
            QueueFullError: `max_queue` jobs are already waiting for a place in the batch.
            ValueError: the job has more choices than a batch holds.
        """
        if not 1 <= len(job.params) <= self.max_batch_size:
            raise ValueError(f"a request may have 1 to {self.max_batch_size} choices, got {len(job.params)}")
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (the limit is {self.max_queue})")
            self._waiting.append(job)
            self._wake.notify()

    # --- the model's side ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self.rows or self.prefilling):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as err:  # a failed step fails its rows, never the server
                logger.exception("generation step failed")
                self._fail([row.job for row in self.rows], f"generation failed: {err}")
                self.rows, self.batch = [], RunningBatch(self.engine.model)
        prefilling = self.prefilling[0] if self.prefilling else []
        self._fail([*(row.job for row in self.rows), *prefilling, *self._waiting], "the server is shutting down")

    @torch.no_grad()
    def step(self) -> None:
        """Drop cancelled rows, admit what fits, prefill one chunk, run one decoding step for every row."""
        if any(row.job.cancelled for row in self.rows):
            self.stats.cancelled += len({row.job for row in self.rows if row.job.cancelled})
            self._retire()
        if self.prefilling is None:
            self._admit()
        if self.prefilling is not None:
            self._prefill_chunk()
        if not self.rows:
            return
        logits = self.batch.step(torch.tensor([row.token for row in self.rows]))
        self._advance(self.rows, logits)
        self.stats.steps += 1

    def _admit(self) -> None:
        """Take the waiting jobs that fit and start their prefill (the visual encoders run here, whole)."""
        jobs: list[Job] = []
        room = self.max_batch_size - len(self.rows)
        with self._wake:
            while self._waiting and (self._waiting[0].cancelled or len(self._waiting[0].params) <= room):
                job = self._waiting.popleft()
                if job.cancelled:
                    self.stats.cancelled += 1
                else:
                    jobs.append(job)
                    room -= len(job.params)
        if not jobs:
            return
        try:
            self.prefilling = jobs, self._prefill(jobs)
        except Exception as err:
            logger.exception("prefill failed")
            self._fail(jobs, f"prefill failed: {err}")

    def _prefill(self, jobs: list[Job]) -> Prefill:
        engine = self.engine
        batch = engine.processor.pad([job.prompt_ids for job in jobs], padding_side="left")
        image_features = engine.image_features([image for job in jobs for image in job.images])
        video_features = engine.video_features([video for job in jobs for video in job.videos])
        repeats = [len(job.params) for job in jobs]
        columns = max(1, self.prefill_chunk // len(jobs))  # (J, columns) positions per chunk
        return Prefill(engine.model, batch["input_ids"], batch["attention_mask"], repeats, image_features,
                       video_features, columns)  # fmt: skip

    def _prefill_chunk(self) -> None:
        """Run the next chunk of the jobs being prefilled; once their prompts are in, their rows join the batch."""
        jobs, pending = self.prefilling
        if all(job.cancelled for job in jobs):
            self.stats.cancelled += len(jobs)
            self.prefilling = None
            return
        try:
            if not pending.advance():
                return
            logits = self.batch.join(pending)
        except Exception as err:
            logger.exception("prefill failed")
            self.prefilling = None
            self._fail(jobs, f"prefill failed: {err}")
            return
        self.prefilling = None
        rows = [self._row(job, choice, params) for job in jobs for choice, params in enumerate(job.params)]
        self.rows += rows
        self.stats.admitted += len(jobs)
        self.stats.prompt_tokens += sum(len(job.prompt_ids) for job in jobs)
        self._advance(rows, logits)

    def _row(self, job: Job, choice: int, params: SamplingParams) -> _Row:
        # Choice i of a seeded request draws from seed + i: choice 0 is what the engine gives for the seed alone.
        seed = secrets.randbits(63) if params.seed is None else params.seed + choice
        generator = torch.Generator(device=self.engine.model.device).manual_seed(seed)
        detok = Detokenizer(self.engine.processor.tokenizer, params.stop, self.engine.eos_ids)
        sampling = params.with_(stop=(), seed=None, max_new_tokens=1)
        return _Row(job, choice, params, detok, generator, [t for t in job.prompt_ids if t >= 0], sampling)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample the next token of `rows` (the last `len(rows)` rows of the batch) and retire finished ones."""
        for row, token in zip(rows, _sample(rows, logits), strict=True):
            row.take(token)
        self.stats.record(len(rows))
        if any(row.done for row in rows):
            self._retire()

    def _retire(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not (row.done or row.job.cancelled)]
        self.batch.keep(keep)
        self.rows = [self.rows[i] for i in keep]

    def _fail(self, jobs: Sequence[Job], message: str) -> None:
        for job in dict.fromkeys(jobs):
            self.stats.failed += 1
            job.emit(Failed(message))


def _sample(rows: list[_Row], logits: torch.Tensor) -> list[int]:
    """One token per row; rows that sample alike (whatever their seeds and stop strings) are sampled together."""
    groups: dict[SamplingParams, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.sampling, []).append(i)
    tokens = [0] * len(rows)
    for params, members in groups.items():
        index = torch.tensor(members, device=logits.device)
        picked = sample_next(
            logits[index], params, [rows[i].history for i in members], [rows[i].generator for i in members]
        )
        for i, token in zip(members, picked.tolist(), strict=True):
            tokens[i] = token
    return tokens
