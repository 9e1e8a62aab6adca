"""Kubernetes Events about cars' Nodes (``kubectl describe node`` shows them), aggregated and rate-limited.

What it is for: a person must see why a car stopped taking work (it drove off, its battery fell under the
owner's floor, its link closed) without a flapping car flooding the API server. ``record`` is cheap and
synchronous; an ``Events`` controller writes them:

- aggregation: repeats of the same reason on the same Node within ``window_s`` update one Event (its count,
  last timestamp and latest message) instead of creating new ones, as client-go's event aggregator does;
- a per-Node token bucket (``burst`` writes, then one per ``refill_s``, client-go's spam filter figures) bounds
  the writes a single car can cause; a dirty aggregate waits for a token, so counts stay right, only later.

Events are best-effort: a write that keeps failing is dropped after a few attempts (and counted), never retried
forever. What it must never do: block the caller, write per occurrence, or let one car use another's budget.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from fleetlet.kube import Controller, ControllerObserver, GiveUp, Requeue

from .kube import ShimApi
from .metrics import ShimMetrics

log = logging.getLogger(__name__)
EVENT_NAMESPACE = "default"  # where node events live (the kubelet's choice; kubectl describe node finds them)
MAX_ATTEMPTS = 4


@dataclass
class _Aggregate:
    node: str
    type: str
    reason: str
    message: str
    name: str
    first: datetime
    last: datetime
    count: int = 1
    written_count: int = 0  # 0 = not created yet
    attempts: int = 0


@dataclass
class _Bucket:
    tokens: float
    at: float = field(default_factory=time.monotonic)


class EventRecorder:
    def __init__(self, api: ShimApi, metrics: ShimMetrics, *, component: str, instance: str,
                 window_s: float = 600.0, burst: int = 25, refill_s: float = 300.0,
                 observer: ControllerObserver | None = None, workers: int = 2) -> None:
        self.api = api
        self.metrics = metrics
        self.component = component
        self.instance = instance
        self.window_s = window_s
        self.burst = burst
        self.refill_s = refill_s
        self._aggregates: dict[str, _Aggregate] = {}
        self._buckets: dict[str, _Bucket] = {}
        self.controller = Controller("events", self.sync, workers=workers, observer=observer)

    def record(self, node: str, type_: str, reason: str, message: str) -> None:
        """Note an Event about ``node``; written soon, aggregated with repeats of ``reason``."""
        now = datetime.now(UTC)
        key = f"{node}|{reason}"
        agg = self._aggregates.get(key)
        if agg is not None and (now - agg.last).total_seconds() <= self.window_s:
            agg.count += 1
            agg.last, agg.message, agg.type = now, message, type_
        else:
            name = f"{node}.{int(now.timestamp() * 1e6):x}"
            self._aggregates[key] = _Aggregate(node, type_, reason, message, name, now, now)
        self.metrics.events.labels(reason).inc()
        self.controller.enqueue(key)

    def _take(self, node: str) -> float:
        """Take a token from the node's bucket; returns 0 if one was taken, else seconds until one is there."""
        now = time.monotonic()
        bucket = self._buckets.get(node)
        if bucket is None:
            bucket = self._buckets[node] = _Bucket(tokens=float(self.burst), at=now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) / self.refill_s)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) * self.refill_s

    async def sync(self, key: str) -> Requeue | None:
        agg = self._aggregates.get(key)
        if agg is None or agg.written_count == agg.count:
            self._prune()
            return None
        wait = self._take(agg.node)
        if wait > 0:
            self.metrics.events_throttled.inc()
            return Requeue(after=wait)
        count = agg.count
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": agg.name, "namespace": EVENT_NAMESPACE},
            # The kubelet's convention for node events: the uid is the Node's name.
            "involvedObject": {"kind": "Node", "apiVersion": "v1", "name": agg.node, "uid": agg.node},
            "type": agg.type,
            "reason": agg.reason,
            "message": agg.message[:1024],
            "source": {"component": self.component, "host": self.instance},
            "reportingComponent": self.component,
            "reportingInstance": self.instance,
            "firstTimestamp": _ts(agg.first),
            "lastTimestamp": _ts(agg.last),
            "count": count,
        }
        try:
            await self.api.post_event(body, update=agg.written_count > 0)
        except Exception as exc:
            agg.attempts += 1
            if agg.attempts >= MAX_ATTEMPTS:
                agg.written_count = agg.count  # best-effort: give this one up
                self.metrics.events_dropped.inc()
                raise GiveUp(f"event {agg.reason} on {agg.node} not written: {exc}") from exc
            raise
        agg.attempts = 0
        agg.written_count = count
        return None

    def _prune(self) -> None:
        if len(self._aggregates) < 4096:
            return
        now = datetime.now(UTC)
        for key, agg in list(self._aggregates.items()):
            if agg.written_count == agg.count and (now - agg.last).total_seconds() > self.window_s:
                del self._aggregates[key]


def _ts(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")
