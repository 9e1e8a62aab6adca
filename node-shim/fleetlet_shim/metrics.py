"""The shim's Prometheus metrics (beside every component's: API calls, controllers, Events, process), created on
an injected registry (no global state).

Labels are of low cardinality: verbs, resources, reasons, controller names; never a car's or a pod's name.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleetlet.kube.metrics import ComponentMetrics


class ShimMetrics(ComponentMetrics):
    def __init__(self, registry: CollectorRegistry, *, process: bool = True) -> None:
        super().__init__(registry, "shim", process=process)
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
