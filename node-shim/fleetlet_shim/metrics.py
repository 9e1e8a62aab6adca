"""The shim's Prometheus metrics, created on an injected registry (no global state).

Labels are of low cardinality: verbs, resources, reasons, controller names; never a car's or a pod's name.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    platform_collector,
    process_collector,
)


class ShimMetrics:
    def __init__(self, registry: CollectorRegistry, *, process: bool = True) -> None:
        self.registry = registry
        if process:  # resident memory, CPU seconds, open fds, GC: what an operator watches first
            process_collector.ProcessCollector(registry=registry)
            platform_collector.PlatformCollector(registry=registry)
            gc_collector.GCCollector(registry=registry)
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
        self.pod_status_writes = Counter(
            "fleetlet_shim_pod_status_writes_total", "Pod status writes (car reports, coalesced)", registry=registry
        )
        self.assignments_sent = Counter(
            "fleetlet_shim_assignments_sent_total", "Shard assignments sent to cars", registry=registry
        )
        self.stops_sent = Counter("fleetlet_shim_stops_sent_total", "Stops sent to cars", registry=registry)
        self.telemetry_writes = Counter(
            "fleetlet_shim_telemetry_writes_total", "VehicleNode status telemetry writes", registry=registry
        )
        self.telemetry_coalesced = Counter(
            "fleetlet_shim_telemetry_coalesced_total", "Telemetry reports folded into a later write",
            registry=registry,
        )
        self.taint_writes = Counter(
            "fleetlet_shim_taint_writes_total", "Node taint/label/cordon writes from car state", registry=registry
        )
        self.taint_conflicts = Counter(
            "fleetlet_shim_taint_conflicts_total", "Taint writes redone after someone else wrote the Node",
            registry=registry,
        )
        self.events = Counter("fleetlet_shim_events_total", "Events recorded (before aggregation)", ["reason"],
                              registry=registry)
        self.events_throttled = Counter(
            "fleetlet_shim_events_throttled_total", "Event writes delayed by a car's event budget", registry=registry
        )
        self.events_dropped = Counter(
            "fleetlet_shim_events_dropped_total", "Events given up after failed writes", registry=registry
        )
        self.syncs = Counter(
            "fleetlet_shim_controller_syncs_total", "Controller syncs by outcome", ["controller", "outcome"],
            registry=registry,
        )
        self.sync_seconds = Histogram(
            "fleetlet_shim_controller_sync_seconds", "Controller sync duration", ["controller"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=registry,
        )
        self.queue_ready = Gauge(
            "fleetlet_shim_controller_queue_ready", "Keys waiting for a worker", ["controller"], registry=registry
        )
        self.queue_scheduled = Gauge(
            "fleetlet_shim_controller_queue_scheduled", "Keys scheduled for later", ["controller"], registry=registry
        )

    # ---- KubeClient hooks ------------------------------------------------------------------------------------

    def observe_retry(self, verb: str, resource: str) -> None:
        self.api_retries.labels(verb, resource).inc()

    def observe_call(self, verb: str, resource: str, status: int, seconds: float) -> None:
        self.api_calls.labels(verb, resource, str(status)).inc()
        self.api_seconds.labels(verb).observe(seconds)
        if status == 0 or status == 429 or status >= 500:
            self.api_errors.labels(verb, resource).inc()

    # ---- EventCounters -----------------------------------------------------------------------------------

    def event_recorded(self, reason: str) -> None:
        self.events.labels(reason).inc()

    def event_throttled(self) -> None:
        self.events_throttled.inc()

    def event_dropped(self) -> None:
        self.events_dropped.inc()

    # ---- ControllerObserver ----------------------------------------------------------------------------------

    def sync_finished(self, controller: str, outcome: str, seconds: float) -> None:
        self.syncs.labels(controller, outcome).inc()
        self.sync_seconds.labels(controller).observe(seconds)

    def queue_depth(self, controller: str, ready: int, scheduled: int) -> None:
        self.queue_ready.labels(controller).set(ready)
        self.queue_scheduled.labels(controller).set(scheduled)
