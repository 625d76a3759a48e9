"""Prometheus metrics. No label carries a user id, a conversation id or a secret: labels are
the RPC, the upstream protocol, the workflow and error reasons, all from small fixed sets.

Hot-path cost is kept off the per-chunk path: a stream's counts are added once, when it ends.
`MetricsRegistry` (a registry and the endpoint serving it) is shared with the agent server's
metrics (`agent/metrics.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIServer

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
from healthagent_service.listen import parse_listen

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class StreamMetrics(NamedTuple):
    """The children a Chat stream updates when it ends, their labels resolved once: each
    `labels()` call locks and looks up (about a fifth of what the metrics cost a turn)."""

    time_to_first_chunk: Histogram
    added_latency: Histogram
    relayed_chunks: Counter
    input_tokens: Counter
    output_tokens: Counter


class MetricsRegistry:
    """A registry of its own (several servers in one test process must not share figures) and
    the `/metrics` endpoint that serves it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._servers: list[WSGIServer] = []

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on host:port (port 0 picks one); return the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._servers.append(server)
        return int(server.server_port)

    def serve_at(
        self, listen: str, worker_index: int | None, check_exposure: Callable[[str], None]
    ) -> int:
        """Serve /metrics where `listen` (`HOST:PORT`, empty: off) says, once `check_exposure`
        let its host through (it raises for a host the settings do not allow off loopback);
        the port, 0 when off. Worker *i* of `serve --workers` serves on PORT + i: one scrape
        target per worker."""
        if not listen:
            return 0
        host, port = parse_listen(listen)
        check_exposure(host)
        if port and worker_index is not None:
            port += worker_index
        return self.serve(host, port)

    def close(self) -> None:
        """Stop serving (blocks up to half a second: the server's poll interval), freeing the
        port for a restart in the same process."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()


class Metrics(MetricsRegistry):
    """The service's metrics."""

    def __init__(self) -> None:
        super().__init__()
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
