"""Token generation as small pure functions over a KV cache: `forward_step`, `prefill` (also in chunks), and
`generate_tokens`.

This layer knows nothing of text: ids and visual features in, one token per row per step out. Batches are
left-padded; positions come from the attention mask, so a padded row computes what it would compute alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer

from openowl.infer.sampling import SamplingParams, sample_next
from openowl.model.owl import OwlForConditionalGeneration


class ChunkedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of a buffer that grows `chunk` positions at a time.

    transformers' layer concatenates (copies) the whole cache at every step; on a CPU that was a tenth of a batch-8
    decoding step. Here a step writes its positions in place. Whatever replaces `keys` / `values` by other tensors
    (a batch selection, the server's regrouping) is copied into a fresh buffer at the next update; cropping keeps
    a view of the buffer, whose tail the next update overwrites.
    """

    chunk = 256

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.get_seq_length()
        new = old + key_states.shape[-2]
        buffers = getattr(self, "_buffers", None)
        if (
            buffers is None
            or new > buffers[0].shape[-2]
            or not all(_is_prefix_view(t, b) for t, b in zip((self.keys, self.values), buffers, strict=True))
        ):
            capacity = -(-new // self.chunk) * self.chunk
            buffers = tuple(
                _grown(t if old else None, like, capacity)
                for t, like in ((self.keys, key_states), (self.values, value_states))
            )
            self._buffers = buffers
        buffers[0][..., old:new, :] = key_states
        buffers[1][..., old:new, :] = value_states
        self.keys, self.values = buffers[0][..., :new, :], buffers[1][..., :new, :]
        return self.keys, self.values


def _is_prefix_view(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    return (
        t.dim() == 4 and t.data_ptr() == buffer.data_ptr() and t.shape[:2] == buffer.shape[:2]
        and t.stride() == buffer.stride()
    )  # fmt: skip


def _grown(t: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
    """A `(B, H, capacity, D)` buffer shaped after `like`, starting with `t`'s positions."""
    buffer = like.new_empty(*like.shape[:-2], capacity, like.shape[-1])
    if t is not None:
        buffer[..., : t.shape[-2], :] = t
    return buffer


def new_cache(model: OwlForConditionalGeneration) -> DynamicCache:
    cache = DynamicCache(config=model.language_model.config)
    cache.layers = [ChunkedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def forward_step(
    model: OwlForConditionalGeneration,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Cache,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run `(B, L, D)` new embeddings against the cache; `attention_mask` covers cache + new (positions come from it
    unless given). -> `(B, V)` logits of the last position."""
    out = model(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True,
        logits_to_keep=1,
    )  # fmt: skip
    return out.logits[:, -1]


def prefill(
    model: OwlForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Cache,
    image_features: torch.Tensor | None = None,
    video_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed `(B, L)` prompt ids (visual tokens spliced in) and fill the cache. -> `(B, V)` logits of the last
    position, and the attention mask over cache + prompt (to extend step by step).

    With a non-empty cache (a reused prefix), `input_ids` are only the new tokens and the mask is extended over
    the cached positions, which are all real tokens.
    """
    *_, done = prefill_chunks(model, input_ids, attention_mask, cache, image_features, video_features)
    return done


def prefill_chunks(
    model: OwlForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Cache,
    image_features: torch.Tensor | None = None,
    video_features: torch.Tensor | None = None,
    chunk: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
    """`prefill`, `chunk` prompt positions per forward pass (None: all at once): yields None after each chunk but the
    last, then `prefill`'s logits and mask. A caller can run other work on the model between two chunks."""
    embeds = model.embed_inputs(input_ids, image_features=image_features, video_features=video_features)
    attention_mask = attention_mask.to(embeds.device)
    past = cache.get_seq_length()
    if past:
        attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], past), attention_mask], dim=1)
    length = embeds.shape[1]
    step = chunk or max(length, 1)
    for start in range(0, max(length, 1), step):
        end = min(start + step, length)  # positions come from the mask up to each chunk's end
        logits = forward_step(model, embeds[:, start:end], attention_mask[:, : past + end], cache)
        if end < length:
            yield None
    yield logits, attention_mask


def decode_one_token(
    model: OwlForConditionalGeneration,
    token: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    cache: Cache,
) -> torch.Tensor:
    """One decoding step: `(B,)` tokens at `(B, 1)` positions -> `(B, V)` logits. With a static cache the mask has
    the cache's full length and this function sees the same shapes every step (compile it)."""
    return forward_step(model, model.embed_text(token[:, None]), attention_mask, cache, positions)


@dataclass(frozen=True)
class DecodeStep:
    """The function that runs one decoding step (`decode_one_token`'s signature), and whether it needs static,
    preallocated KV caches (a compiled step sees the same shapes at every step only with those)."""

    run: Callable = decode_one_token
    static_cache: bool = False


EAGER_STEP = DecodeStep()


@torch.no_grad()
def generate_tokens(
    model: OwlForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    params: SamplingParams,
    image_features: torch.Tensor | None = None,
    video_features: torch.Tensor | None = None,
    cache: Cache | None = None,
    history: list[list[int]] | None = None,
    decode: Callable = decode_one_token,
    lookahead: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Yield `(B,)` next tokens (on the CPU), step by step, up to `params.max_new_tokens`; stop iterating to stop
    early.

    Args:
        cache: a DynamicCache (default; may hold a reused prefix) or a StaticCache sized for prompt + new tokens.
        history: each row's earlier text ids, for the repetition controls (defaults to the prompt's text ids).
        decode: the decoding step, e.g. `torch.compile(decode_one_token, mode="reduce-overhead")`.
        lookahead: queue the next step before yielding a token, so that the device computes it while the caller
            reads the token (which waits only for the sampling). Default: on CUDA, whose kernels run
            asynchronously; on a CPU it would only delay every token by a step. A caller that stops early has
            then run one step more: the cache also holds the last yielded token.
    """
    cache = cache if cache is not None else new_cache(model)
    logits, mask = prefill(model, input_ids, attention_mask, cache, image_features, video_features)
    if history is None:
        history = [[int(t) for t, m in zip(row, row_mask, strict=True) if m and t >= 0]
                   for row, row_mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True)]  # fmt: skip
    static = isinstance(cache, StaticCache)
    rows, used = mask.shape
    width = cache.get_max_length() if static else used + params.max_new_tokens
    full = torch.cat([mask, mask.new_zeros(rows, width - used)], dim=1)  # the mask over every future position
    generators = _generators(params.seed, rows, logits.device)
    lookahead = logits.device.type == "cuda" if lookahead is None else lookahead

    def step(token: torch.Tensor) -> torch.Tensor:  # feed `token`, return the next logits
        nonlocal used
        full[:, used] = 1
        used += 1
        positions = full[:, :used].sum(-1, keepdim=True) - 1  # (B, 1)
        return decode(model, token.to(model.device), full if static else full[:, :used], positions, cache)

    for i in range(params.max_new_tokens):
        token = sample_next(logits, params, history, generators)
        on_host, copied = _copy_to_host(token)
        more = i + 1 < params.max_new_tokens
        if more and lookahead:
            logits = step(token)
        if copied is not None:
            copied.synchronize()  # waits for the sampling only, not for the step queued after it
        if params.repetition_penalty != 1.0 or params.no_repeat_ngram_size:
            for row, t in enumerate(on_host.tolist()):
                history[row].append(t)
        yield on_host
        if more and not lookahead:
            logits = step(token)


def _copy_to_host(token: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying `(B,)` sampled tokens to the host; -> the host tensor and, on CUDA, the event to wait for.

    The copy goes to pinned memory, queued right after the sampling. A caller's `.tolist()` of the CUDA tensor would
    copy in the stream's order, after the step that lookahead queued: it waited for that step too, and the GPU then
    idled while the host queued the next one, and the loop ran behind its compiled step replayed back to back; with
    this copy it runs at the replay's speed (measured: docs/performance.md, GPU: an H100).
    """
    if token.device.type != "cuda":
        return token, None
    on_host = token.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(token.device))  # the copy's stream: with `device_map`, the last GPU's
    return on_host, copied


def static_cache(model: OwlForConditionalGeneration, max_len: int) -> StaticCache:
    """A preallocated cache for `max_len` positions (prompt + new tokens), for compiled decoding."""
    return StaticCache(config=model.language_model.config, max_cache_len=max_len)


def _generators(seed: int | None, rows: int, device: torch.device) -> list[torch.Generator] | None:
    """One generator per row, all seeded alike: a row's sample depends on its prompt and seed, not its batch."""
    if seed is None:
        return None
    return [torch.Generator(device=device).manual_seed(seed) for _ in range(rows)]
