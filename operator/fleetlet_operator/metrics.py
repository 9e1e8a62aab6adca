"""The operator's Prometheus metrics, created on an injected registry (no global state).

Labels are of low cardinality (phases, states, reasons, controller names): never a job's, car's or pod's name.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleetlet.kube.metrics import ComponentMetrics


class OperatorMetrics(ComponentMetrics):
    def __init__(self, registry: CollectorRegistry, *, process: bool = True) -> None:
        super().__init__(registry, "operator", process=process)
        p = self.prefix
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
        self.withdrawn = Counter(p + "results_withdrawn_total",
                                 "Accepted results withdrawn before the merge because their cars lost trust",
                                 registry=registry)
        self.audits = Counter(p + "audit_replicas_total", "Single-replica shards re-run on a second car",
                              registry=registry)
        self.pods_created = Counter(p + "pods_created_total", "Shard pods created", registry=registry)
        self.pods_deleted = Counter(p + "pods_deleted_total", "Shard pods deleted", registry=registry)
        self.ledger_writes = Counter(p + "ledger_writes_total", "Ledger ConfigMap writes", registry=registry)
        self.status_writes = Counter(p + "status_writes_total", "FleetJob status writes", registry=registry)
        self.reconcile_errors = Counter(p + "reconcile_errors_total", "Reconciles that failed and are retried",
                                        ["controller"], registry=registry)

    def sync_finished(self, controller: str, outcome: str, seconds: float) -> None:
        super().sync_finished(controller, outcome, seconds)
        if outcome in ("error", "timeout"):
            self.reconcile_errors.labels(controller).inc()
