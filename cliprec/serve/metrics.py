"""Prometheus collectors of `cliprec serve` and the route label they are counted under."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from starlette.routing import Match
from starlette.types import Scope

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Prometheus collectors on a registry of their own (one per app: tests build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, fds
        self.requests = Counter(
            "cliprec_http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cliprec_http_request_duration_seconds",
            "Time from request to the end of the response, by route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "cliprec_http_work_in_flight", "Admitted requests to the work routes", registry=self.registry
        )
        self.rejected = Counter(
            "cliprec_http_rejected",
            "Requests and connections refused before any work, by reason (too_large, saturated,"
            " connections, header_too_large, header_timeout, body_timeout, bad_request)",
            ["reason"],
            registry=self.registry,
        )
        self.connections = Gauge(
            "cliprec_http_connections", "Open HTTP connections (refused ones until closed)",
            registry=self.registry,
        )  # fmt: skip
        self.batch = Histogram(
            "cliprec_search_batch_size",
            "Searches answered together by the worker",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.search = Histogram(
            "cliprec_search_duration_seconds",
            "Time from queueing a search to its answer, per query kind (all requested variants)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )


def route_label(scope: Scope) -> str:
    """The matched route's path template (bounded label values), or 'unmatched'."""
    router = getattr(scope.get("app"), "router", None)  # Starlette puts itself in the scope
    for route in getattr(router, "routes", []):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "unmatched")
    return "unmatched"
