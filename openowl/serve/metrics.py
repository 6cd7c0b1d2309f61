"""The `/metrics` endpoint's numbers: a middleware that counts chat-completion responses by HTTP status, and the
scheduler's queue, batch and token counters in Prometheus' text format."""

from __future__ import annotations

from collections import Counter

from openowl.serve.scheduler import Scheduler

MEDIA_TYPE = "text/plain; version=0.0.4"  # Prometheus' text exposition format


class StatusCounter:
    """Pure ASGI middleware: counts the responses to `path` by HTTP status in `counts`."""

    def __init__(self, app, counts: Counter, path: str):
        self.app, self.counts, self.path = app, counts, path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


def render_metrics(scheduler: Scheduler, statuses: Counter) -> str:
    """Prometheus text format: `statuses` (chat-completion responses by status) and the scheduler's counters."""
    stats = scheduler.stats
    series = [
        ("requests_total", "counter", "chat-completion responses by HTTP status",
         [(f'{{code="{code}"}}', n) for code, n in sorted(statuses.items())]),
        ("requests_waiting", "gauge", "requests in the queue, waiting for a place in the batch", scheduler.waiting),
        ("queue_limit", "gauge", "the most requests that may wait (--max-queue)", scheduler.max_queue),
        ("batch_rows", "gauge", "rows being decoded (one per choice)", scheduler.running),
        ("batch_rows_limit", "gauge", "the most rows decoded together (--max-batch-size)", scheduler.max_batch_size),
        ("requests_admitted_total", "counter", "requests that entered the batch", stats.admitted),
        ("requests_cancelled_total", "counter", "requests whose client left before the end", stats.cancelled),
        ("requests_failed_total", "counter", "requests that failed inside the model", stats.failed),
        ("prompt_tokens_total", "counter", "prompt tokens prefilled", stats.prompt_tokens),
        ("generation_tokens_total", "counter", "tokens generated", stats.generated_tokens),
        ("decode_steps_total", "counter", "batched decoding steps", stats.steps),
        ("generation_tokens_per_second", "gauge", "tokens generated per second over the last 10 s",
         round(stats.tokens_per_second(), 3)),
    ]  # fmt: skip
    lines = []
    for name, kind, help_, values in series:
        lines += [f"# HELP openowl_{name} {help_}", f"# TYPE openowl_{name} {kind}"]
        lines += [f"openowl_{name}{labels} {v}" for labels, v in values] if isinstance(values, list) else [
            f"openowl_{name} {values}"
        ]  # fmt: skip
    return "\n".join(lines) + "\n"
