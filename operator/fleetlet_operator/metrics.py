"""The operator's Prometheus metrics, created on an injected registry (no global state).

Labels are of low cardinality (phases, states, reasons, controller names): never a job's, car's or pod's name.
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


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry, *, process: bool = True) -> None:
        self.registry = registry
        if process:
            process_collector.ProcessCollector(registry=registry)
            platform_collector.PlatformCollector(registry=registry)
            gc_collector.GCCollector(registry=registry)
        p = "fleetlet_operator_"
        self.jobs = Gauge(p + "jobs", "FleetJobs by phase", ["phase"], registry=registry)
        self.shards = Gauge(p + "shards", "Shards of live FleetJobs by state", ["state"], registry=registry)
        self.shard_seconds = Histogram(p + "shard_seconds", "First pod created to result accepted",
                                       buckets=(1, 2, 5, 10, 30, 60, 120, 300, 900, 1800, 3600), registry=registry)
        self.retries = Counter(p + "shard_retries_total", "Shard attempts after a failure of the shard itself",
                               registry=registry)
        self.departures = Counter(p + "departures_total", "Shard attempts ended by the car going away (free)",
                                  registry=registry)
        self.disagreements = Counter(p + "verification_disagreements_total",
                                     "Results rejected because other cars disagreed", registry=registry)
        self.audits = Counter(p + "audit_replicas_total", "Single-replica shards re-run on a second car",
                              registry=registry)
        self.pods_created = Counter(p + "pods_created_total", "Shard pods created", registry=registry)
        self.pods_deleted = Counter(p + "pods_deleted_total", "Shard pods deleted", registry=registry)
        self.ledger_writes = Counter(p + "ledger_writes_total", "Ledger ConfigMap writes", registry=registry)
        self.status_writes = Counter(p + "status_writes_total", "FleetJob status writes", registry=registry)
        self.api_calls = Counter(p + "api_calls_total", "Kubernetes API calls", ["verb", "resource", "code"],
                                 registry=registry)
        self.api_seconds = Histogram(p + "api_call_seconds", "API call latency", ["verb"],
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                     registry=registry)
        self.syncs = Counter(p + "controller_syncs_total", "Controller syncs by outcome", ["controller", "outcome"],
                             registry=registry)
        self.reconcile_errors = Counter(p + "reconcile_errors_total", "Reconciles that failed and are retried",
                                        ["controller"], registry=registry)
        self.sync_seconds = Histogram(p + "controller_sync_seconds", "Controller sync duration", ["controller"],
                                      buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                      registry=registry)
        self.queue_ready = Gauge(p + "controller_queue_ready", "Keys waiting for a worker", ["controller"],
                                 registry=registry)
        self.events = Counter(p + "events_total", "Events recorded (before aggregation)", ["reason"],
                              registry=registry)
        self.events_throttled = Counter(p + "events_throttled_total", "Event writes delayed by an object's budget",
                                        registry=registry)
        self.events_dropped = Counter(p + "events_dropped_total", "Events given up after failed writes",
                                      registry=registry)

    def event_recorded(self, reason: str) -> None:
        self.events.labels(reason).inc()

    def event_throttled(self) -> None:
        self.events_throttled.inc()

    def event_dropped(self) -> None:
        self.events_dropped.inc()

    def observe_call(self, verb: str, resource: str, status: int, seconds: float) -> None:
        self.api_calls.labels(verb, resource, str(status)).inc()
        self.api_seconds.labels(verb).observe(seconds)

    def sync_finished(self, controller: str, outcome: str, seconds: float) -> None:
        self.syncs.labels(controller, outcome).inc()
        self.sync_seconds.labels(controller).observe(seconds)
        if outcome in ("error", "timeout"):
            self.reconcile_errors.labels(controller).inc()

    def queue_depth(self, controller: str, ready: int, scheduled: int) -> None:
        self.queue_ready.labels(controller).set(ready)
