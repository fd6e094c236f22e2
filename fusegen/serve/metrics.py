"""The server's Prometheus metrics, in a registry of its own (so several apps in one process,
as in tests, never collide). ``GET /metrics`` serves ``render()``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, loop):
        """``loop``: the ``EngineLoop`` whose queue and KV pool the gauges read."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fusegen_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("fusegen_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("fusegen_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("fusegen_time_to_first_token_seconds", "time from arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("fusegen_time_per_output_token_seconds",
                                   "time between a request's successive tokens", buckets=_PER_TOKEN_BUCKETS,
                                   registry=r)
        self.latency = Histogram("fusegen_request_latency_seconds", "time from arrival to the last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        pool = loop.engine.kv.pool
        Gauge("fusegen_kv_blocks_total", "KV blocks in the paged pool", registry=r).set(pool.num_blocks)
        Gauge("fusegen_kv_blocks_in_use", "KV blocks held by sequences",
              registry=r).set_function(lambda: pool.num_blocks - pool.num_free)
        Gauge("fusegen_requests_waiting", "requests queued, not yet running (queue depth)",
              registry=r).set_function(lambda: loop.num_waiting)
        Gauge("fusegen_requests_running", "requests in the running batch",
              registry=r).set_function(lambda: loop.num_running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
