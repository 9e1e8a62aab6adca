"""The pod controller: the pods bound to this replica's cars, run on those cars, with their status in the API.

Keys are pod keys (``namespace/name``) and car keys (``@car``). ``sync(pod)``, idempotent:

1. writes the latest status its car reported (coalesced: many reports, one write; a running pod's progress at
   most once per ``pod_progress_interval_s``, a change of phase, container state or checkpoint at once). A final
   status, once written, is acked to the car, which only then forgets the assignment: a report is never lost to a
   dropped link or a crashed shim.
2. a terminal pod being deleted: the deletion is finished (grace 0), as a kubelet does once containers are gone.
3. a pod being deleted that its car still runs: ``stop`` is sent (again every ``stop_resend_s`` until the car
   reports), with the grace left; if the car never confirms, the deletion is finished ``deletion_slack_s`` after
   its grace period. A car that is gone (or never had it) has nothing to stop: finished at once.
4. a live pod its car does not hold: admitted as a kubelet would (``podstatus.admit``: runtime, one container,
   the assignment, resources that fit) and sent as ``assign`` with a grant covering exactly its digests — or
   failed with a reason. A car that lost an assignment (it restarted) gets it again, resuming from the pod's
   latest checkpoint.

``sync(@car)`` after a car (re)connects: what the car holds but no pod of ours explains (deleted while it was
away) is stopped, or acked if the car already finished it.

A pod deleted from the API while its car runs it is stopped on the car. Every send that fails (the car's link is
busy or down) is retried; nothing is dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fleetlet.api.v1alpha1.shard import ShardCheckpoint
from fleetlet.artifacts import GrantSigner
from fleetlet.carlink.protocol import Ack, Assign, Grant, PodStatus, Stop
from fleetlet.kube import Change, Controller, ControllerObserver, Informer, Requeue, Retry
from fleetlet.kube.client import ApiError

from . import podstatus
from .cars import Car, CarRegistry
from .interfaces import CarChannel
from .kube import ShimApi
from .logs import PodLogs
from .metrics import ShimMetrics
from .nodespec import capacity
from .settings import ShimSettings

log = logging.getLogger(__name__)
CAR_PREFIX = "@"
FINAL = ("Succeeded", "Failed")


def index_pods(pods: Informer) -> None:
    """The indexes the pod controller and the link's report check use: pods by Node and by uid."""
    pods.add_index("node", lambda p: [p["spec"]["nodeName"]])
    pods.add_index("uid", lambda p: [p["metadata"]["uid"]])


def owns_report(pods: Informer, car: str, uid: str) -> bool:
    """May ``car`` report on assignment ``uid``? About its own pods only. About a uid no pod of ours has (the
    pod is gone) it may: the report is answered with ack or stop and changes nothing."""
    for key in pods.by_index("uid", uid):
        pod = pods.get(key)
        if pod is not None and pod["spec"]["nodeName"] != car:
            return False
    return True


@dataclass(frozen=True, slots=True)
class _Pending:
    """A status to write for one pod: the latest its car reported (or what the shim decided)."""

    status: dict[str, Any]
    final: bool  # the car's last word on the assignment: ack it once written
    shape: tuple[str, str, str]  # (phase, container state, checkpoint digest): a change is written at once


class PodController:
    def __init__(self, api: ShimApi, registry: CarRegistry, pods: Informer, channel: CarChannel,
                 signer: GrantSigner, logs: PodLogs, settings: ShimSettings, metrics: ShimMetrics,
                 observer: ControllerObserver | None = None) -> None:
        self.api = api
        self.registry = registry
        self.pods = pods
        self.channel = channel
        self.signer = signer
        self.logs = logs
        self.settings = settings
        self.metrics = metrics
        self._pending: dict[str, _Pending] = {}  # uid -> status to write
        self._written: dict[str, tuple[tuple[str, str, str], float]] = {}  # uid -> (shape, when) last written
        self._gone: dict[str, tuple[str, str]] = {}  # pod key -> (uid, node) of a pod deleted from the API
        pods.add_handler(self._pod_changed)
        self.controller = Controller("pods", self.sync, workers=settings.workers["pods"], observer=observer)

    # ---- what others call -------------------------------------------------------------------------------------

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.pods.get(f"{namespace}/{name}")

    def keys_on(self, car: str) -> frozenset[str]:
        return self.pods.by_index("node", car)

    def enqueue_car(self, car: str) -> None:
        self.controller.enqueue(CAR_PREFIX + car)
        for key in self.keys_on(car):
            self.controller.enqueue(key)

    def report(self, car: str, msg: PodStatus) -> None:
        """A car's report: queue the status write (coalescing with any not yet written)."""
        keys = self.pods.by_index("uid", msg.uid)
        if not keys:
            # No pod of ours has this uid any more: the car may forget a finished one, and must stop a live one.
            reply = Ack(uid=msg.uid) if msg.phase in FINAL else Stop(uid=msg.uid, grace_seconds=0,
                                                                       reason="PodNotFound")
            self.channel.send(car, reply)
            return
        key = next(iter(keys))
        pod = self.pods.get(key)
        if pod is None:
            return
        final = msg.phase in FINAL
        if final and podstatus.is_terminal(pod):
            # Already settled in the API (a re-send after a reconnect, or the pod ended otherwise): the pod's
            # terminal status is not rewritten; the car may forget the assignment.
            self._ack(car, msg.uid)
            return
        status = podstatus.status_from_report(pod, msg, self.settings.advertise_address)
        checkpoint = msg.checkpoint.sha256 if msg.checkpoint else ""
        self._pending[msg.uid] = _Pending(status, final, (msg.phase, msg.container.state, checkpoint))
        self.controller.enqueue(key)

    # ---- informer ---------------------------------------------------------------------------------------------

    def _pod_changed(self, change: Change) -> None:
        if change.type == "DELETED":
            self._gone[change.key] = (change.obj["metadata"]["uid"], change.obj["spec"]["nodeName"])
        self.controller.enqueue(change.key)

    # ---- sync -------------------------------------------------------------------------------------------------

    async def sync(self, key: str) -> Requeue | None:
        if key.startswith(CAR_PREFIX):
            await self._sync_car(key[len(CAR_PREFIX):])
            return None
        pod = self.pods.get(key)
        gone = self._gone.get(key)
        if gone is not None and (pod is None or pod["metadata"]["uid"] != gone[0]):
            await self._sync_gone(key)  # deleted (and perhaps re-created under the same name)
        if pod is None:
            return None
        meta = pod["metadata"]
        uid, node = meta["uid"], pod["spec"]["nodeName"]
        car = self.registry.get(node)
        later: float | None = None
        written_final = False
        pending = self._pending.get(uid)
        if pending is not None:
            wait = self._progress_wait(uid, pending)
            if wait > 0:
                later = wait
            else:
                written_final = await self._write(key, pod, uid, pending, car)
        terminal = podstatus.is_terminal(pod) or written_final
        if terminal:
            if meta.get("deletionTimestamp"):
                await self.api.finish_pod_deletion(meta["namespace"], meta["name"], uid)
                self._forget(uid)
            return None
        if meta.get("deletionTimestamp"):
            return _sooner(later, await self._sync_deleting(pod, car))
        if car is None or not car.connected or uid in car.held:
            return Requeue(after=later) if later is not None else None
        await self._dispatch(pod, car)
        return Requeue(after=later) if later is not None else None

    def _progress_wait(self, uid: str, pending: _Pending) -> float:
        written = self._written.get(uid)
        if pending.final or written is None or written[0] != pending.shape:
            return 0.0
        return max(0.0, self.settings.pod_progress_interval_s - (time.monotonic() - written[1]))

    async def _write(self, key: str, pod: dict[str, Any], uid: str, pending: _Pending, car: Car | None) -> bool:
        meta = pod["metadata"]
        try:
            await self.api.patch_pod_status(meta["namespace"], meta["name"], uid, pending.status,
                                            urgent=pending.final)
        except ApiError as exc:
            if exc.not_found or exc.conflict or exc.status == 422:  # gone or replaced by a pod of the same name
                self._pending.pop(uid, None)
                return False
            raise
        if self._pending.get(uid) is pending:
            del self._pending[uid]
        self._written[uid] = (pending.shape, time.monotonic())
        self.metrics.pod_status_writes.inc()
        if pending.final and car is not None:
            self._ack(car.name, uid)
        return pending.final

    def _ack(self, car: str, uid: str) -> None:
        state = self.registry.get(car)
        if self.channel.send(car, Ack(uid=uid)) and state is not None:
            state.held.discard(uid)
        # If the ack could not go out, the car still holds the final status and re-sends it after its next hello;
        # it is acked then (report() sees the pod already terminal).

    async def _sync_deleting(self, pod: dict[str, Any], car: Car | None) -> Requeue | None:
        meta = pod["metadata"]
        uid = meta["uid"]
        s = self.settings
        if car is not None and not car.connected and time.monotonic() - car.changed_at < s.reconnect_grace_s:
            return Requeue(after=s.reconnect_grace_s)  # a blip: the car may be back at once
        if car is None or not car.connected or uid not in car.held:
            await self.api.finish_pod_deletion(meta["namespace"], meta["name"], uid)
            self._forget(uid)
            return None
        deadline = _parse_ts(meta["deletionTimestamp"])
        now = datetime.now(UTC)
        left = (deadline - now).total_seconds()
        if left < -s.deletion_slack_s:
            log.warning("pod %s/%s: car %s did not confirm the stop within its grace period; finishing the "
                        "deletion", meta["namespace"], meta["name"], car.name)
            await self.api.finish_pod_deletion(meta["namespace"], meta["name"], uid)
            self._forget(uid)
            return None
        sent = car.stop_sent.get(uid)
        if sent is None or time.monotonic() - sent >= s.stop_resend_s:
            if not self.channel.send(car.name, Stop(uid=uid, grace_seconds=max(0.0, left), reason="PodDeleted")):
                raise Retry("the car's link is busy; the stop is sent again shortly", delay=1.0)
            car.stop_sent[uid] = time.monotonic()
            self.metrics.stops_sent.inc()
        return Requeue(after=max(0.5, min(s.stop_resend_s, left + s.deletion_slack_s)))

    async def _dispatch(self, pod: dict[str, Any], car: Car) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        vn = self.registry.vehiclenode(car.name)
        if vn is None:
            return
        accel = vn.spec.hardware.accelerators
        try:
            assignment = podstatus.admit(pod, list(car.hello.runtimes), capacity(vn, self.settings.max_pods_per_car,
                                                                                car.hello.providers),
                                         accel[0].type if accel else None)
        except podstatus.Rejection as rej:
            log.info("car %s: pod %s/%s rejected: %s", car.name, meta["namespace"], meta["name"], rej.message)
            self.metrics.pods_rejected.labels(rej.reason).inc()
            self._pending[uid] = _Pending(podstatus.rejected_status(rej.reason, rej.message), False,
                                          ("Failed", "rejected", ""))
            self.controller.enqueue(f"{meta['namespace']}/{meta['name']}")
            return
        latest = podstatus.latest_checkpoint(pod)
        if latest is not None and (assignment.resume_from is None
                                   or latest[1] > assignment.resume_from.items_done):
            # The car lost this assignment (it restarted): resume from the pod's own latest checkpoint.
            assignment.resume_from = ShardCheckpoint(sha256=latest[0], items_done=latest[1])
        digests = [assignment.model.sha256, assignment.input.sha256]
        if assignment.resume_from is not None:
            digests.append(assignment.resume_from.sha256)
        token = self.signer.issue_grant(digests, ttl=self.settings.grant_ttl_s, upload=True,
                                        subject=f"{car.name}/{uid}")
        msg = Assign(uid=uid, namespace=meta["namespace"], name=meta["name"], assignment=assignment,
                     grant=Grant(token=token, base_url=self.settings.artifact_base_url))
        if not self.channel.send(car.name, msg):
            raise Retry("the car's link is busy; the assignment is sent again shortly", delay=1.0)
        car.held.add(uid)
        self.metrics.assignments_sent.inc()
        log.info("car %s: assigned pod %s/%s", car.name, meta["namespace"], meta["name"])
        if not pod.get("status", {}).get("containerStatuses") and uid not in self._pending:
            self._pending[uid] = _Pending(podstatus.dispatched_status(pod, self.settings.advertise_address), False,
                                          ("Pending", "waiting", ""))
            self.controller.enqueue(f"{meta['namespace']}/{meta['name']}")

    async def _sync_gone(self, key: str) -> None:
        gone = self._gone.pop(key, None)
        if gone is None:
            return
        uid, node = gone
        car = self.registry.get(node)
        self._forget(uid)
        if car is not None and car.connected and uid in car.held:
            if not self.channel.send(node, Stop(uid=uid, grace_seconds=0, reason="PodDeleted")):
                self._gone[key] = gone
                raise Retry("the car's link is busy; the stop is sent again shortly", delay=1.0)
            self.metrics.stops_sent.inc()

    async def _sync_car(self, name: str) -> None:
        car = self.registry.get(name)
        if car is None or not car.connected:
            return
        ours = {p["metadata"]["uid"] for k in self.keys_on(name) if (p := self.pods.get(k)) is not None}
        phases = {a.uid: a.phase for a in car.hello.assignments}
        for uid in sorted(car.held - ours):
            if phases.get(uid) in FINAL:
                reply: Ack | Stop = Ack(uid=uid)
            else:
                reply = Stop(uid=uid, grace_seconds=0, reason="PodNotFound")
            if not self.channel.send(name, reply):
                raise Retry("the car's link is busy", delay=1.0)
            if isinstance(reply, Ack):
                car.held.discard(uid)

    def _forget(self, uid: str) -> None:
        self._pending.pop(uid, None)
        self._written.pop(uid, None)
        self.logs.drop(uid)


def _parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _sooner(a: float | None, b: Requeue | None) -> Requeue | None:
    if a is None:
        return b
    if b is None:
        return Requeue(after=a)
    return Requeue(after=min(a, b.after))
