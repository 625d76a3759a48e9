"""Prometheus metrics. No label carries a user id, a conversation id or a secret: labels are
the RPC, the upstream protocol, the workflow and error reasons, all from small fixed sets.

Hot-path cost is kept off the per-chunk path: a stream's counts are added once, when it ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from healthagent_service.domain.session_pool import SessionPool

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class StreamMetrics(NamedTuple):
    """The children a Chat stream updates when it ends, their labels resolved once: each
    `labels()` call locks and looks up (about a fifth of what the metrics cost a turn)."""

    time_to_first_chunk: Histogram
    added_latency: Histogram
    relayed_chunks: Counter
    input_tokens: Counter
    output_tokens: Counter


class Metrics:
    """The service's metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.active_streams = Gauge(
            "healthagent_active_streams", "Chat streams open now.", registry=self.registry
        )
        self.time_to_first_chunk = Histogram(
            "healthagent_time_to_first_chunk_seconds",
            "From the Chat request to the first text chunk sent to the caller.",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.added_latency = Histogram(
            "healthagent_added_latency_seconds",
            "Per Chat stream: its duration minus the time spent waiting on the upstream.",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.relayed_chunks = Counter(
            "healthagent_relayed_chunks",
            "Text chunks relayed to callers.",
            ["upstream"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "healthagent_upstream_errors",
            "Failed calls, by ErrorInfo reason.",
            ["rpc", "reason"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "healthagent_tokens",
            "Tokens the upstream reported, by workflow or model.",
            ["workflow", "direction"],
            registry=self.registry,
        )

    def for_streams(self, upstream: str, workflow: str) -> StreamMetrics:
        """What streams of `upstream` (its workflow or model `workflow`) update."""
        return StreamMetrics(
            self.time_to_first_chunk.labels(upstream),
            self.added_latency.labels(upstream),
            self.relayed_chunks.labels(upstream),
            self.tokens.labels(workflow, "input"),
            self.tokens.labels(workflow, "output"),
        )

    def watch_pools(self, pools: dict[str, SessionPool]) -> None:
        """Export the session pools' hit, miss, eviction and mint counters and sizes."""
        self.registry.register(_PoolCollector(pools))

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on host:port (port 0 picks one); return the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


class _PoolCollector(Collector):
    def __init__(self, pools: dict[str, SessionPool]) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Any]:
        for field, help_text in (
            ("hits", "Sessions handed out from the pool."),
            ("misses", "Requests the pool could not serve at once."),
            ("evictions", "Sessions dropped from the pool."),
            ("mints", "Sessions minted upstream."),
        ):
            family = CounterMetricFamily(
                f"healthagent_session_pool_{field}", help_text, labels=["pool"]
            )
            for name, pool in self._pools.items():
                family.add_metric([name], getattr(pool.stats, field))
            yield family
        size = GaugeMetricFamily(
            "healthagent_session_pool_size", "Sessions pooled now.", labels=["pool"]
        )
        for name, pool in self._pools.items():
            size.add_metric([name], len(pool))
        yield size
