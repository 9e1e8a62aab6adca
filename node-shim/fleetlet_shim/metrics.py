"""The shim's Prometheus metrics, created on an injected registry (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ShimMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.cars_connected = Gauge("fleetlet_shim_cars_connected", "Cars with an open link", registry=registry)
        self.nodes_ready = Gauge("fleetlet_shim_nodes_ready", "Car Nodes this shim reports Ready", registry=registry)
        self.lease_lag = Histogram(
            "fleetlet_shim_lease_renewal_lag_seconds",
            "How late a Lease renewal was written after it fell due",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20),
            registry=registry,
        )
        self.lease_renewals = Counter("fleetlet_shim_lease_renewals_total", "Lease renewals written", registry=registry)
        self.pods = Gauge("fleetlet_shim_pods", "Pods on this shim's cars by phase", ["phase"], registry=registry)
        self.api_calls = Counter(
            "fleetlet_shim_api_calls_total", "Kubernetes API calls", ["verb", "resource", "code"], registry=registry
        )
        self.api_errors = Counter(
            "fleetlet_shim_api_errors_total", "API calls that failed (transport, 429, 5xx)", ["verb", "resource"],
            registry=registry,
        )
        self.api_retries = Counter(
            "fleetlet_shim_api_retries_total", "API calls retried after a transient failure", ["verb", "resource"],
            registry=registry,
        )
        self.api_seconds = Histogram(
            "fleetlet_shim_api_call_seconds", "API call latency", ["verb"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=registry,
        )
        self.pods_rejected = Counter(
            "fleetlet_shim_pods_rejected_total", "Pods a car could not run", ["reason"], registry=registry
        )
        self.telemetry_writes = Counter(
            "fleetlet_shim_telemetry_writes_total", "VehicleNode status telemetry writes", registry=registry
        )
        self.telemetry_coalesced = Counter(
            "fleetlet_shim_telemetry_coalesced_total", "Telemetry reports folded into a later write",
            registry=registry,
        )

    def observe_retry(self, verb: str, resource: str) -> None:
        self.api_retries.labels(verb, resource).inc()

    def observe_call(self, verb: str, resource: str, status: int, seconds: float) -> None:
        self.api_calls.labels(verb, resource, str(status)).inc()
        self.api_seconds.labels(verb).observe(seconds)
        if status == 0 or status == 429 or status >= 500:
            self.api_errors.labels(verb, resource).inc()
