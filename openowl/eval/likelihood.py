"""Log-likelihood of a continuation after a prompt: option scoring for multiple choice and lmms-eval's
`loglikelihood` requests.

The continuation is tokenized on its own and appended to the prompt's ids: the ids the model would produce if it
generated that text after the prompt (the prompt ends in "AI: ", whose "▁" the engine's prompts also end in).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openowl.infer.engine import Engine, Request
from openowl.processing import check_media_count


@torch.no_grad()
def continuation_logprobs(
    engine: Engine, requests: Sequence[Request], continuations: Sequence[str]
) -> list[tuple[float, bool]]:
    """Score one continuation per request, as one left-padded batch.

    Returns:
        per row, the summed log-probability of the continuation's tokens and whether greedy decoding would
        produce exactly those tokens.

    Raises:
        ValueError: an empty continuation, or prompts and media that don't match.
    """
    processor, model = engine.processor, engine.model
    rows, lengths = [], []
    for request, text in zip(requests, continuations, strict=True):
        continuation = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not continuation:
            raise ValueError(f"the continuation {text!r} has no tokens")
        rows.append(processor.tokenize_prompt(request.prompt) + continuation)
        lengths.append(len(continuation))
    images = [img for r in requests for img in r.images]
    videos = [v for r in requests for v in r.videos]
    check_media_count([r.prompt for r in requests], len(images), len(videos))
    batch = processor.pad(rows, padding_side="left")
    embeds = model.embed_inputs(
        batch["input_ids"], image_features=engine.image_features(images), video_features=engine.video_features(videos)
    )
    span = max(lengths)  # only the positions that predict continuation tokens get logits
    logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], logits_to_keep=span + 1).logits
    logprobs = logits[:, :-1].float().log_softmax(-1)  # (B, span, V): each predicts the token after it
    targets = batch["input_ids"][:, -span:].to(logprobs.device)  # (B, span)
    out = []
    for row, n in enumerate(lengths):  # left padding: the continuation is the last n tokens of every row
        scores, wanted = logprobs[row, -n:], targets[row, -n:]
        total = scores.gather(-1, wanted[:, None]).sum()
        out.append((float(total), bool((scores.argmax(-1) == wanted).all())))
    return out
