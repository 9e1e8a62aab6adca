"""The VehicleNode side of the operator: the drain finalizer and the cars' trust records.

- Every VehicleNode carries the finalizer ``fleetlet.io/drain``. When a car's VehicleNode is deleted, its shard
  pods are deleted gracefully (the car stops at a checkpoint, the shard resumes elsewhere at no cost to its job),
  and only when none is left is the finalizer removed and the car let go.
- Trust (``status.trust``): verdicts from verification arrive from the job controller and are applied per car, in
  order, by one worker per car (``trust/<car>`` keys), so two jobs judging one car never lose an update. A valid
  result extends the car's run of valid results; an invalid one resets it, and the car becomes *untrusted* (the
  shim then taints it ``fleetlet.io/untrusted``: no more work) when it alone produced the rejected result, or at its
  second rejected result (a car that resumed from a liar's checkpoint is not condemned on that alone).
- ``cars()`` is the view the planner reads (owner, run of valid results, untrusted, and since when its Node has
  not been Ready), kept from the VehicleNode and car Node informers. The Node's Ready condition is written by the
  node lifecycle controller when the shim stops renewing the car's Lease, so it says "lost" even when the shim
  serving the car is itself gone.

Runs as one ``Controller`` over keys ``<car>`` (finalizer, drain) and ``trust/<car>``; no per-object timers.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from fleetlet.kube import Change, Controller, Informer, Requeue, Retry
from fleetlet.kube.client import ApiError

from .kube import OperatorApi
from .metrics import OperatorMetrics
from .reconcile.model import CarView, TrustVerdict

log = logging.getLogger(__name__)
FINALIZER = "fleetlet.io/drain"
TRUST_PREFIX = "trust/"


class VehicleController:
    def __init__(self, api: OperatorApi, vehiclenodes: Informer, pods: Informer, metrics: OperatorMetrics,
                 *, workers: int, nodes: Informer | None = None) -> None:
        self.api = api
        self.vehiclenodes = vehiclenodes
        self.pods = pods
        self.metrics = metrics
        self._cars: dict[str, CarView] = {}
        self._lost: dict[str, datetime] = {}  # car -> since when its Node has not been Ready
        if nodes is not None:
            nodes.add_handler(self._node_changed)
        self._verdicts: dict[str, list[TrustVerdict]] = defaultdict(list)
        self._applying: set[str] = set()  # cars whose rejected results are being written to their VehicleNode
        # Cars this process marked untrusted whose VehicleNode, as the informer shows it, does not say so yet: an
        # older version (the shim's telemetry write before ours) must not make the car look trusted again while
        # a job re-plans to withdraw its results. Cleared once the informer shows the car untrusted.
        self._untrusted_unseen: set[str] = set()
        self._on_untrusted: Callable[[str], None] | None = None
        pods.add_index("node", lambda p: [p["spec"]["nodeName"]] if p["spec"]["nodeName"] else [])
        vehiclenodes.add_handler(self._changed)
        self.controller = Controller("vehiclenodes", self.sync, workers=workers, observer=metrics)

    def cars(self) -> dict[str, CarView]:
        return self._cars

    def judging(self, cars: Iterable[str]) -> bool:
        """Whether a rejected result of any of ``cars`` is still to be recorded (it may cost the car its trust,
        and its other accepted results with it): a job waits for that before it merges its output."""
        return any(car in self._applying or any(not v.valid for v in self._verdicts.get(car, ()))
                   for car in set(cars))

    def on_untrusted(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(car)`` whenever a car loses trust (the FleetJob controller re-plans its live jobs)."""
        self._on_untrusted = callback

    def record(self, verdicts: list[TrustVerdict]) -> None:
        for v in verdicts:
            self._verdicts[v.car].append(v)
            self.controller.enqueue(TRUST_PREFIX + v.car)
            if not v.valid:
                self.metrics.disagreements.inc()

    def _changed(self, change: Change) -> None:
        name = change.key
        if change.type == "DELETED":
            self._cars.pop(name, None)
            self._untrusted_unseen.discard(name)
            return
        obj = change.obj
        trust = obj["status"].get("trust") or {}
        untrusted = bool(trust.get("untrusted", False))
        if name in self._untrusted_unseen:
            if untrusted:
                self._untrusted_unseen.discard(name)  # our write is in: from here on the API is the authority
            else:
                untrusted = True
        self._cars[name] = CarView(owner=obj["spec"]["owner"]["id"], valid_streak=int(trust.get("validStreak", 0)),
                                   untrusted=untrusted, lost_since=self._lost.get(name))
        meta = obj["metadata"]
        if meta.get("deletionTimestamp") or FINALIZER not in (meta.get("finalizers") or []):
            self.controller.enqueue(name)

    def _node_changed(self, change: Change) -> None:
        name = change.key
        since = None if change.type == "DELETED" else _not_ready_since(change.obj)
        if since is not None and name in self._lost:
            # NotReady -> Unknown (the shim said the link closed, then the Lease lapsed) is a new transition of
            # the same outage: the car has been lost since the first.
            since = min(since, self._lost[name])
        if since is None:
            self._lost.pop(name, None)
        else:
            self._lost[name] = since
        view = self._cars.get(name)
        if view is not None and view.lost_since != since:
            self._cars[name] = replace(view, lost_since=since)

    async def sync(self, key: str) -> Requeue | None:
        if key.startswith(TRUST_PREFIX):
            await self._apply_trust(key[len(TRUST_PREFIX):])
            return None
        vn = self.vehiclenodes.get(key)
        if vn is None:
            return None
        meta = vn["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp"):
            if FINALIZER not in finalizers:
                return None
            left = 0
            for pod_key in self.pods.by_index("node", key):
                pod = self.pods.get(pod_key)
                if pod is None or pod["status"].get("phase") in ("Succeeded", "Failed"):
                    continue
                left += 1
                if not pod["metadata"].get("deletionTimestamp"):
                    await self.api.delete_pod(pod["metadata"]["namespace"], pod["metadata"]["name"])
                    log.info("car %s is being removed: stopping shard pod %s/%s", key,
                             pod["metadata"]["namespace"], pod["metadata"]["name"])
            if left:
                return Requeue(after=2.0)  # the car checkpoints and stops; look again shortly
            await self._set_finalizers(key, [f for f in finalizers if f != FINALIZER], meta["resourceVersion"])
            log.info("car %s drained: its VehicleNode may go", key)
            return None
        if FINALIZER not in finalizers:
            await self._set_finalizers(key, [*finalizers, FINALIZER], meta["resourceVersion"])
        return None

    async def _set_finalizers(self, name: str, finalizers: list[str], rv: str) -> None:
        try:
            await self.api.set_vehiclenode_finalizers(name, finalizers, rv)
        except ApiError as exc:
            if exc.not_found:
                return
            if exc.conflict:
                raise Retry("the VehicleNode changed meanwhile", delay=0.5) from exc
            raise

    async def _apply_trust(self, car: str) -> None:
        verdicts = self._verdicts.pop(car, [])
        vn = self.vehiclenodes.get(car)
        if not verdicts or vn is None:
            return
        if any(not v.valid for v in verdicts):
            self._applying.add(car)
        try:
            await self._write_trust(car, vn, verdicts)
        finally:
            self._applying.discard(car)

    async def _write_trust(self, car: str, vn: dict[str, Any], verdicts: list[TrustVerdict]) -> None:
        trust: dict[str, Any] = dict(vn["status"].get("trust") or {})
        streak, valid, invalid = (int(trust.get(k, 0)) for k in ("validStreak", "validTotal", "invalidTotal"))
        was_untrusted = untrusted = bool(trust.get("untrusted", False))
        message = str(trust.get("message", ""))
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for v in verdicts:
            if v.valid:
                streak, valid = streak + 1, valid + 1
                continue
            streak, invalid = 0, invalid + 1
            trust["lastInvalidAt"] = now
            if not untrusted and (v.sole or invalid >= 2):
                untrusted = True
                message = (f"shard {v.shard}: its result disagreed with other cars' ({invalid} rejected results); "
                           "it gets no work until an administrator clears status.trust.untrusted")
                log.warning("car %s lost trust: %s", car, message)
        trust.update(validStreak=streak, validTotal=valid, invalidTotal=invalid, untrusted=untrusted,
                     message=message)
        try:
            await self.api.patch_trust(car, trust)
        except ApiError:
            self._verdicts[car][:0] = verdicts  # keep them, in order, for the retry
            raise
        self._cars[car] = CarView(owner=self._cars.get(car, CarView(owner="")).owner, valid_streak=streak,
                                  untrusted=untrusted, lost_since=self._lost.get(car))
        if untrusted and not was_untrusted:  # only on the loss of trust: the jobs re-plan once, not per verdict
            self._untrusted_unseen.add(car)
            if self._on_untrusted is not None:
                self._on_untrusted(car)


def _not_ready_since(node: dict[str, Any]) -> datetime | None:
    """When the car's Node stopped being Ready (False or Unknown); None while it is Ready or nothing says."""
    cond = next((c for c in node["status"].get("conditions") or [] if c.get("type") == "Ready"), None)
    if cond is None or cond.get("status") == "True" or not cond.get("lastTransitionTime"):
        return None
    try:
        return datetime.fromisoformat(str(cond["lastTransitionTime"]).replace("Z", "+00:00"))
    except ValueError:
        return None
