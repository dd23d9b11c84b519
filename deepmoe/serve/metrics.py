"""The server's Prometheus metrics, served as text at GET /metrics.

Each server owns its own registry (no process-global state, so two apps in one process do not collide).
The engine thread updates everything; prometheus-client's metrics are thread-safe. Tokens per second is
`rate(deepmoe_generation_tokens_total[1m])` in PromQL; the throughput gauge is the same over the last
10 s, for a glance without a Prometheus server.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    def __init__(self, window_s: float = 10.0):
        r = self.registry = CollectorRegistry()
        self.waiting = Gauge("deepmoe_num_sequences_waiting", "sequences queued for a slot in the engine",
                             registry=r)
        self.running = Gauge("deepmoe_num_sequences_running", "sequences holding KV-cache blocks", registry=r)
        self.kv_usage = Gauge("deepmoe_kv_cache_usage_ratio", "fraction of KV-cache blocks in use (0 to 1)",
                              registry=r)
        self.prompt_tokens = Counter("deepmoe_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("deepmoe_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("deepmoe_time_to_first_token_seconds", "arrival to first generated token, per "
                              "sequence", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("deepmoe_e2e_request_latency_seconds", "arrival to finish, per sequence",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.finished = Counter("deepmoe_requests", "finished sequences (one per choice) by finish reason: stop, "
                                "length, abort (client left), error", ["finish_reason"], registry=r)
        self.throughput = Gauge("deepmoe_generation_tokens_per_second", f"tokens generated per second over the "
                                f"last {window_s:g} s", registry=r)
        self.throughput.set_function(self._recent_rate)
        self._window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._lock = threading.Lock()  # the engine thread appends while a scrape reads

    def observe_engine(self, engine) -> None:
        self.waiting.set(len(engine.scheduler.waiting))
        self.running.set(len(engine.scheduler.running))
        self.kv_usage.set(engine.blocks.usage())

    def on_request(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_tokens(self, n: int) -> None:
        self.generation_tokens.inc(n)
        now = time.monotonic()
        with self._lock:  # one entry per 0.1 s, not per sequence and step, keeps the window short
            if self._recent and now - self._recent[-1][0] < 0.1:
                now, n = self._recent[-1][0], self._recent.pop()[1] + n
            self._recent.append((now, n))

    def on_finish(self, reason: str, seconds: float) -> None:
        self.finished.labels(finish_reason=reason).inc()
        self.e2e.observe(seconds)

    def _recent_rate(self) -> float:
        cutoff = time.monotonic() - self._window_s
        with self._lock:
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self._window_s

    def render(self) -> bytes:
        return generate_latest(self.registry)
