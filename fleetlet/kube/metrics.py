"""The metrics every Fleetlet component reports the same way, on an injected registry (no global state): its API
calls (from ``KubeClient``'s observer hooks), its controllers (``ControllerObserver``), its Events
(``EventCounters``) and its process (memory, CPU, open files, GC). Names are ``fleetlet_<component>_…``; labels
are of low cardinality (verbs, resources, codes, controller names, reasons), never an object's name."""

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


class ComponentMetrics:
    def __init__(self, registry: CollectorRegistry, component: str, *, process: bool = True) -> None:
        self.registry = registry
        if process:  # resident memory, CPU seconds, open fds, GC: what an operator watches first
            process_collector.ProcessCollector(registry=registry)
            platform_collector.PlatformCollector(registry=registry)
            gc_collector.GCCollector(registry=registry)
        p = f"fleetlet_{component}_"
        self.prefix = p
        self.api_calls = Counter(p + "api_calls_total", "Kubernetes API calls", ["verb", "resource", "code"],
                                 registry=registry)
        self.api_errors = Counter(p + "api_errors_total", "API calls that failed (transport, 429, 5xx)",
                                  ["verb", "resource"], registry=registry)
        self.api_retries = Counter(p + "api_retries_total", "API calls retried after a transient failure",
                                   ["verb", "resource"], registry=registry)
        self.api_seconds = Histogram(p + "api_call_seconds", "API call latency", ["verb"],
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=registry)
        self.syncs = Counter(p + "controller_syncs_total", "Controller syncs by outcome", ["controller", "outcome"],
                             registry=registry)
        self.sync_seconds = Histogram(p + "controller_sync_seconds", "Controller sync duration", ["controller"],
                                      buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                      registry=registry)
        self.queue_ready = Gauge(p + "controller_queue_ready", "Keys waiting for a worker", ["controller"],
                                 registry=registry)
        self.queue_scheduled = Gauge(p + "controller_queue_scheduled", "Keys scheduled for later", ["controller"],
                                     registry=registry)
        self.events = Counter(p + "events_total", "Events recorded (before aggregation)", ["reason"],
                              registry=registry)
        self.events_throttled = Counter(p + "events_throttled_total", "Event writes delayed by an object's budget",
                                        registry=registry)
        self.events_dropped = Counter(p + "events_dropped_total", "Events given up after failed writes",
                                      registry=registry)

    # ---- KubeClient hooks ------------------------------------------------------------------------------------

    def observe_call(self, verb: str, resource: str, status: int, seconds: float) -> None:
        self.api_calls.labels(verb, resource, str(status)).inc()
        self.api_seconds.labels(verb).observe(seconds)
        if status == 0 or status == 429 or status >= 500:
            self.api_errors.labels(verb, resource).inc()

    def observe_retry(self, verb: str, resource: str) -> None:
        self.api_retries.labels(verb, resource).inc()

    # ---- ControllerObserver ----------------------------------------------------------------------------------

    def sync_finished(self, controller: str, outcome: str, seconds: float) -> None:
        self.syncs.labels(controller, outcome).inc()
        self.sync_seconds.labels(controller).observe(seconds)

    def queue_depth(self, controller: str, ready: int, scheduled: int) -> None:
        self.queue_ready.labels(controller).set(ready)
        self.queue_scheduled.labels(controller).set(scheduled)

    # ---- EventCounters ---------------------------------------------------------------------------------------

    def event_recorded(self, reason: str) -> None:
        self.events.labels(reason).inc()

    def event_throttled(self) -> None:
        self.events_throttled.inc()

    def event_dropped(self) -> None:
        self.events_dropped.inc()
