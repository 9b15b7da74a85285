"""``GET /metrics``: Prometheus text. Invocations by event and outcome and their durations
are counted as they happen; workers and sessions are read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime.core import Runtime
from runtime.invocations import Invocation

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, runtime: Runtime, active_connections: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.invocations = Counter(
            "chatfn_invocations",
            "Handler invocations by app, event and outcome (succeeded or the error code).",
            ("app", "event", "outcome"),
            registry=self.registry,
        )
        self.duration = Histogram(
            "chatfn_invocation_duration_seconds",
            "Wall-clock time of handler invocations.",
            ("event",),
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Live(runtime, active_connections))
        runtime.observers.append(self.observe)

    def observe(self, invocation: Invocation) -> None:
        outcome = invocation.error.code if invocation.error else "succeeded"
        self.invocations.labels(invocation.app, invocation.event, outcome).inc()
        self.duration.labels(invocation.event).observe(invocation.duration_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    def __init__(self, runtime: Runtime, active_connections: Callable[[], int]) -> None:
        self._runtime = runtime
        self._connections = active_connections

    def collect(self) -> Iterator[GaugeMetricFamily]:
        workers = GaugeMetricFamily(
            "chatfn_workers", "Sandbox worker processes, by app and state.", labels=["app", "state"]
        )
        for (app, _version), pool in self._runtime.pool.pools().items():
            stats = pool.stats()
            workers.add_metric([app, "busy"], stats["workers"] - stats["idle"])
            workers.add_metric([app, "idle"], stats["idle"])
        yield workers
        sessions = GaugeMetricFamily(
            "chatfn_active_sessions", "Active sessions in the database, all nodes."
        )
        sessions.add_metric([], self._runtime.active_session_count())
        yield sessions
        connections = GaugeMetricFamily(
            "chatfn_websocket_connections", "Open WebSocket session connections on this node."
        )
        connections.add_metric([], self._connections())
        yield connections
