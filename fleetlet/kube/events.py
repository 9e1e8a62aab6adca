"""Kubernetes Events, aggregated and rate-limited: what a person reads in ``kubectl describe``.

What it is for: a person must see why a car stopped taking work or why a job's shard was rejected, without a
flapping car or a noisy job flooding the API server. ``record`` is cheap and synchronous; an ``events``
controller writes them through the component's one API module (``EventSink``):

- aggregation: repeats of the same reason on the same object within ``window_s`` update one Event (its count,
  last timestamp and latest message) instead of creating new ones, as client-go's event aggregator does;
- a per-object token bucket (``burst`` writes, then one per ``refill_s``, client-go's spam filter figures) bounds
  the writes a single object can cause; a dirty aggregate waits for a token, so counts stay right, only later.

Events are best-effort: a write that keeps failing is dropped after a few attempts (and counted), never retried
forever. What it must never do: block the caller, write per occurrence, or let one object use another's budget.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from .client import MERGE, ApiError, KubeClient, resource_path
from .controller import Controller, ControllerObserver, GiveUp, Requeue

log = logging.getLogger(__name__)
CLUSTER_EVENT_NAMESPACE = "default"  # where events about cluster-scoped objects live (the kubelet's choice)
MAX_ATTEMPTS = 4


class EventSink(Protocol):
    async def post_event(self, body: dict[str, Any], *, update: bool) -> None:
        """Create the Event ``body``, or (``update``) patch its count, lastTimestamp and message."""
        ...


async def write_event(kube: KubeClient, body: dict[str, Any], *, update: bool) -> None:
    """Create the Event, or (``update``) patch its count, lastTimestamp and message; an update whose Event is
    gone re-creates it, and a create that finds it existing is done (a retried POST whose answer was lost)."""
    ns = body["metadata"]["namespace"]
    events = resource_path("v1", "events", ns)
    if update:
        patch = {"count": body["count"], "lastTimestamp": body["lastTimestamp"], "message": body["message"]}
        try:
            await kube.patch(f"{events}/{body['metadata']['name']}", patch, content_type=MERGE)
            return
        except ApiError as exc:
            if not exc.not_found:
                raise
    try:
        await kube.create(events, body)
    except ApiError as exc:
        if not exc.conflict:
            raise


class EventCounters(Protocol):
    """Where the recorder counts what it did (a component's metrics). Never raises."""

    def event_recorded(self, reason: str) -> None: ...

    def event_throttled(self) -> None: ...

    def event_dropped(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """The object an Event is about. For cluster-scoped objects ``namespace`` is None (the Event goes to
    ``default``); for a Node, the kubelet's convention is uid = name (``kubectl describe node`` finds both)."""

    kind: str
    name: str
    api_version: str = "v1"
    namespace: str | None = None
    uid: str | None = None

    def wire(self) -> dict[str, Any]:
        out = {"kind": self.kind, "apiVersion": self.api_version, "name": self.name, "uid": self.uid or self.name}
        if self.namespace:
            out["namespace"] = self.namespace
        return out


def node_ref(name: str) -> ObjectRef:
    return ObjectRef("Node", name)


@dataclass
class _Aggregate:
    ref: ObjectRef
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
    def __init__(self, sink: EventSink, counters: EventCounters, *, component: str, instance: str,
                 window_s: float = 600.0, burst: int = 25, refill_s: float = 300.0,
                 observer: ControllerObserver | None = None, workers: int = 2) -> None:
        self.sink = sink
        self.counters = counters
        self.component = component
        self.instance = instance
        self.window_s = window_s
        self.burst = burst
        self.refill_s = refill_s
        self._aggregates: dict[str, _Aggregate] = {}
        self._buckets: dict[str, _Bucket] = {}
        self.controller = Controller("events", self.sync, workers=workers, observer=observer)

    def record(self, ref: ObjectRef, type_: str, reason: str, message: str) -> None:
        """Note an Event about ``ref``; written soon, aggregated with repeats of ``reason``."""
        now = datetime.now(UTC)
        key = f"{ref.kind}|{ref.namespace or ''}|{ref.name}|{reason}"
        agg = self._aggregates.get(key)
        if agg is not None and (now - agg.last).total_seconds() <= self.window_s:
            agg.count += 1
            agg.last, agg.message, agg.type = now, message, type_
        else:
            name = f"{ref.name[:200]}.{int(now.timestamp() * 1e6):x}"
            self._aggregates[key] = _Aggregate(ref, type_, reason, message, name, now, now)
        self.counters.event_recorded(reason)
        self.controller.enqueue(key)

    def _take(self, ref: ObjectRef) -> float:
        """Take a token from the object's bucket; returns 0 if one was taken, else seconds until one is there."""
        now = time.monotonic()
        key = f"{ref.kind}|{ref.namespace or ''}|{ref.name}"
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(tokens=float(self.burst), at=now)
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
        wait = self._take(agg.ref)
        if wait > 0:
            self.counters.event_throttled()
            return Requeue(after=wait)
        count = agg.count
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": agg.name, "namespace": agg.ref.namespace or CLUSTER_EVENT_NAMESPACE},
            "involvedObject": agg.ref.wire(),
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
            await self.sink.post_event(body, update=agg.written_count > 0)
        except Exception as exc:
            agg.attempts += 1
            if agg.attempts >= MAX_ATTEMPTS:
                agg.written_count = agg.count  # best-effort: give this one up
                self.counters.event_dropped()
                raise GiveUp(f"event {agg.reason} on {agg.ref.kind} {agg.ref.name} not written: {exc}") from exc
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
