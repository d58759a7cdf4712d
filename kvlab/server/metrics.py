"""The server's Prometheus metrics (``GET /metrics``), on a registry of its own per app, so
several servers in one process (tests) count apart. Times are seconds, sizes bytes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Every metric of one server (names follow Prometheus' conventions: ``_total`` counters,
    ``_seconds`` and ``_bytes`` units)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kvlab_requests", "Requests answered, by endpoint and HTTP status (499: the client left)",
            ["endpoint", "status"], registry=r,
        )
        self.queue_length = Gauge("kvlab_queue_length", "Requests waiting for the engine", registry=r)
        self.running = Gauge("kvlab_running_requests", "Requests the engine is generating for", registry=r)
        self.ttft = Histogram(
            "kvlab_time_to_first_token_seconds", "From the request's arrival to its first generated token",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.latency = Histogram(
            "kvlab_request_latency_seconds", "From the request's arrival to its last generated token",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("kvlab_prompt_tokens", "Prompt tokens of answered requests", registry=r)
        self.cached_tokens = Counter(
            "kvlab_cached_tokens", "Prompt tokens served from a stored encoded context (not prefilled)", registry=r,
        )
        self.completion_tokens = Counter("kvlab_completion_tokens", "Tokens generated", registry=r)
        self.kv_bytes_held = Gauge(
            "kvlab_kv_bytes_held", "Measured bytes of the stored encoded contexts (KV cache and last logits)",
            registry=r,
        )
        self.cached_contexts = Gauge("kvlab_cached_contexts", "Encoded contexts in the store", registry=r)
        self.cache_hits = Counter("kvlab_cache_hits", "Requests that reused a stored encoded context", registry=r)
        self.cache_misses = Counter("kvlab_cache_misses", "Requests that encoded their context anew", registry=r)
        self.cache_evictions = Counter("kvlab_cache_evictions", "Encoded contexts evicted to make room", registry=r)


__all__ = ["Metrics"]
