"""Sampling controls and the function that turns last-position logits into the next token of each row."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `do_sample=False` is greedy (temperature, top-k and top-p are then unused)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; > 1 discourages tokens already in the prompt or the output
    no_repeat_ngram_size: int = 0  # 0 = off
    stop: tuple[str, ...] = field(default_factory=tuple)  # the text ends before the first stop string
    seed: int | None = None  # same seed, same prompts -> same text
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit) pairs, as OpenAI's

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError("top_k and no_repeat_ngram_size must be ≥ 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in dict(self.logit_bias).items()))

    def with_(self, **changes) -> SamplingParams:
        return replace(self, **changes)


PRESETS = {
    "greedy": SamplingParams(),
    # The released generation_config.json: sample from the top 3, up to 512 tokens.
    "upstream": SamplingParams(do_sample=True, top_k=3, max_new_tokens=512),
    # The upstream web demo's defaults.
    "upstream-demo": SamplingParams(
        do_sample=True, temperature=1.0, top_k=3, top_p=0.9, no_repeat_ngram_size=2, max_new_tokens=512
    ),
}


def apply_repetition_penalty(logits: torch.Tensor, history: list[list[int]], penalty: float) -> torch.Tensor:
    """CTRL-style, in place: divide positive logits (multiply negative ones) of every token a row has seen."""
    for row, ids in enumerate(history):
        if ids:
            index = torch.tensor(sorted(set(ids)), dtype=torch.long, device=logits.device)
            values = logits[row, index]
            logits[row, index] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def banned_ngram_tokens(row: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `row`."""
    if n <= 0 or len(row) < n:
        return []
    prefix = tuple(row[len(row) - n + 1 :])
    return [row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i : i + n - 1]) == prefix]


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """`(B, V)` -> `(B,)` index of each row's first maximum. On the CPU through NumPy, whose vectorized argmax takes
    a fraction of torch's time over a 32000-token vocabulary (it is a visible part of a batched decoding step;
    measured: docs/performance.md, Serving)."""
    if logits.device.type == "cpu":
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    history: list[list[int]],
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """`(B, V)` logits -> `(B,)` next tokens.

    Args:
        logits: last-position logits of each row.
        params: the sampling controls.
        history: each row's prompt text ids and generated ids so far (for the repetition controls).
        generators: one random source per row (seeded by the caller), or None for the global one.
    """
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.no_repeat_ngram_size:
        for row, ids in enumerate(history):
            banned = banned_ngram_tokens(ids, params.no_repeat_ngram_size)
            if banned:
                logits[row, banned] = float("-inf")
    if params.logit_bias:
        tokens, biases = zip(*params.logit_bias, strict=True)
        logits[:, list(tokens)] += torch.tensor(biases, device=logits.device)
    if not params.do_sample:
        return _argmax(logits)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    return torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generators, strict=True)])[:, 0]
