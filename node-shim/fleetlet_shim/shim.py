"""The shim's controller: the car link's handler on one side, the Kubernetes API on the other.

For each connected car it registers a Node (once), renews the car's Lease on a schedule spread across cars,
dispatches the pods bound to that Node as ``assign`` messages, turns the car's reports into pod status, mirrors
telemetry into VehicleNode status (coalesced), keeps the car's log lines for ``kubectl logs``, and finishes pod
deletions as a kubelet does. A restart rebuilds everything from the API server (informers) and the cars'
``hello`` (the assignments they hold), so nothing is lost and nothing runs twice.

Never: write per car per second, list what an informer already holds, or block the link on the API server
(writes go through coalescing flushers with bounded concurrency).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleetlet.api.v1alpha1 import VehicleNode
from fleetlet.api.v1alpha1.meta import API_VERSION
from fleetlet.artifacts import GrantSigner
from fleetlet.carlink.protocol import (
    Assign,
    CarMessage,
    Checkpoint,
    Grant,
    Hello,
    InputRef,
    Log,
    ModelRef,
    PodStatus,
    Resources,
    Shard,
    Stop,
    TelemetryReport,
)
from fleetlet.kube import ApiError, KubeClient, WatchEvent
from fleetlet.kube.client import STRATEGIC, resource_path
from fleetlet.kube.informer import Informer

from . import node as nodes
from . import podstatus, sharding
from .metrics import ShimMetrics

log = logging.getLogger(__name__)

FIELD_MANAGER = "fleetlet-shim"
VN_PATH = resource_path(API_VERSION, "vehiclenodes")


@dataclass(frozen=True)
class ShimSettings:
    shim_id: str = "shim-0"
    replica: int = 0
    replicas: int = 1
    advertise_address: str = "127.0.0.1"  # the Node's InternalIP: where the API server reaches our kubelet API
    kubelet_port: int = 10250
    artifact_base_url: str = "https://127.0.0.1:8443"  # where cars fetch artifacts (the link listener)
    lease_duration_s: int = 40
    # The kubelet renews every 10 s (6 writes/min). 25 s keeps an idle car under 3 API writes a minute
    # while a node-monitor grace period of 50 s still tolerates one late renewal.
    lease_renew_interval_s: float = 25.0
    status_report_interval_s: float = 300.0  # kubelet's nodeStatusReportFrequency
    telemetry_min_interval_s: float = 60.0  # per car, unless a safety-relevant field changed
    max_pods_per_car: int = 4
    api_concurrency: int = 64  # writes in flight; 5,000 cars renewing every 25 s need ~200 writes/s
    grant_ttl_s: float = 6 * 3600
    log_lines_per_pod: int = 5000
    reconnect_grace_s: float = 2.0  # a link that is back within this long is not reported NotReady


@dataclass
class CarState:
    name: str
    vn: VehicleNode
    hello: Hello
    connected: bool = True
    node_uid: str | None = None
    registered: bool = False
    held: set[str] = field(default_factory=set)  # pod uids the car runs or holds
    stopping: set[str] = field(default_factory=set)
    lease_exists: bool = True  # False until the first renewal of a newly registered car creates it
    generation: int = 0  # bumped on every (re)connect; a stale bring-up task sees it and stops
    telemetry: dict[str, Any] | None = None
    telemetry_written: dict[str, Any] | None = None
    telemetry_written_at: float = 0.0
    status_written_at: float = 0.0


_PRECISION = {"stateOfCharge": 4, "batteryTemperatureC": 1, "computeTemperatureC": 1, "linkQuality": 2}


def _rounded(telemetry: dict[str, Any]) -> dict[str, Any]:
    """What a person reads in ``kubectl get vn`` (and what decides whether a write is due): no float noise."""
    return {k: round(v, _PRECISION[k]) if k in _PRECISION and isinstance(v, float) else v
            for k, v in telemetry.items()}


class PodLogs:
    """The last lines of each pod's log, as the car sent them (``kubectl logs``)."""

    def __init__(self, max_lines: int) -> None:
        self.max_lines = max_lines
        self._lines: dict[str, deque[str]] = {}
        self._next: dict[str, int] = {}

    def add(self, uid: str, offset: int, lines: list[str]) -> None:
        buf = self._lines.setdefault(uid, deque(maxlen=self.max_lines))
        expected = self._next.get(uid, 0)
        skip = max(0, expected - offset)  # a resend after reconnect repeats lines we already hold
        for line in lines[skip:]:
            buf.append(line)
        self._next[uid] = max(expected, offset + len(lines))

    def get(self, uid: str) -> list[str]:
        return list(self._lines.get(uid, ()))

    def drop(self, uid: str) -> None:
        self._lines.pop(uid, None)
        self._next.pop(uid, None)


class Shim:
    """Implements the link's ``LinkHandler``. ``link`` is attached after construction (they reference each other)."""

    def __init__(self, kube: KubeClient, signer: GrantSigner, metrics: ShimMetrics, settings: ShimSettings) -> None:
        self.kube = kube
        self.signer = signer
        self.metrics = metrics
        self.settings = settings
        self.link: Any = None
        self.cars: dict[str, CarState] = {}
        self.vehiclenodes: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}  # uid -> pod, for pods bound to cars this replica owns
        self.pods_by_node: dict[str, set[str]] = {}
        self.pod_key: dict[tuple[str, str], str] = {}  # (namespace, name) -> uid
        self.logs = PodLogs(settings.log_lines_per_pod)
        self._api = asyncio.Semaphore(settings.api_concurrency)
        self._lease_heap: list[tuple[float, str]] = []
        self._lease_due: dict[str, float] = {}  # the one live schedule per car; older heap entries are stale
        self._lease_wakeup = asyncio.Event()
        self._pending_status: dict[str, dict[str, Any]] = {}
        self._status_wakeup = asyncio.Event()
        self._telemetry_wakeup = asyncio.Event()
        self._telemetry_dirty: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._waiting: dict[str, Hello] = {}  # connected cars whose VehicleNode has not been seen yet
        self._pods_synced = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Sync the caches before any car is served: VehicleNodes first (pods are kept only for car Nodes, so
        the cars must be known when the pods arrive), then pods bound to Nodes."""
        vn_informer = Informer(self.kube, VN_PATH, self._on_vehiclenode)
        pod_informer = Informer(
            self.kube, resource_path("v1", "pods"), self._on_pod, fieldSelector="spec.nodeName!="
        )
        self._tasks = [asyncio.create_task(vn_informer.run(), name="vehiclenode-informer")]
        await asyncio.wait_for(vn_informer.synced.wait(), timeout=60)
        self._tasks += [
            asyncio.create_task(pod_informer.run(), name="pod-informer"),
            asyncio.create_task(self._lease_loop(), name="lease-loop"),
            asyncio.create_task(self._status_flusher(), name="pod-status-flusher"),
            asyncio.create_task(self._telemetry_flusher(), name="telemetry-flusher"),
            asyncio.create_task(self._gauge_loop(), name="gauges"),
        ]
        await asyncio.wait_for(pod_informer.synced.wait(), timeout=60)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def owns(self, car: str) -> bool:
        return sharding.owns(car, self.settings.replica, self.settings.replicas)

    # ------------------------------------------------------------------ informers
    async def _on_vehiclenode(self, event: WatchEvent) -> None:
        if event.type == "SYNCED":
            return
        name = event.object["metadata"]["name"]
        if event.type == "DELETED":
            self.vehiclenodes.pop(name, None)
            return
        self.vehiclenodes[name] = event.object
        waiting = self._waiting.get(name)
        if waiting is not None and self.link is not None and self.link.is_connected(name):
            await self.car_connected(name, waiting)
            return
        car = self.cars.get(name)
        if car is not None:
            try:
                car.vn = VehicleNode.model_validate(event.object)
            except ValueError as exc:
                log.warning("car %s: VehicleNode no longer parses: %s", name, exc)

    async def _on_pod(self, event: WatchEvent) -> None:
        if event.type == "SYNCED":
            self._pods_synced.set()
            return
        pod = event.object
        meta = pod["metadata"]
        uid, node = meta["uid"], pod.get("spec", {}).get("nodeName", "")
        if node not in self.vehiclenodes or not self.owns(node):
            return
        if event.type == "DELETED":
            self._forget_pod(uid, node, (meta.get("namespace", ""), meta["name"]))
            car = self.cars.get(node)
            if car and car.connected and uid in car.held:
                await self.link.send(node, Stop(uid=uid, grace_seconds=0, reason="PodDeleted"))
            return
        self.pods[uid] = pod
        self.pods_by_node.setdefault(node, set()).add(uid)
        self.pod_key[(meta.get("namespace", ""), meta["name"])] = uid
        await self._sync_pod(uid)

    def _forget_pod(self, uid: str, node: str, key: tuple[str, str]) -> None:
        self.pods.pop(uid, None)
        self.pods_by_node.get(node, set()).discard(uid)
        self.pod_key.pop(key, None)
        self._pending_status.pop(uid, None)
        self.logs.drop(uid)
        car = self.cars.get(node)
        if car is not None:
            car.held.discard(uid)
            car.stopping.discard(uid)
        if self.link is not None:
            self.link.forget_assignment(node, uid)

    # ------------------------------------------------------------------ pods
    async def _sync_pod(self, uid: str) -> None:
        """Drive one pod toward what its car should be doing. Idempotent."""
        pod = self.pods.get(uid)
        if pod is None:
            return
        node = pod["spec"]["nodeName"]
        car = self.cars.get(node)
        deleting = pod["metadata"].get("deletionTimestamp") is not None
        if podstatus.is_terminal(pod):
            if deleting:
                await self._finish_deletion(pod)
            return
        if deleting:
            if car is not None and car.connected and uid in car.held:
                if uid not in car.stopping:
                    car.stopping.add(uid)
                    grace = pod["metadata"].get("deletionGracePeriodSeconds", 30)
                    await self.link.send(node, Stop(uid=uid, grace_seconds=float(grace), reason="PodDeleted"))
            else:
                # The car does not run it (or is gone): nothing to wait for, finish as a kubelet would.
                await self._finish_deletion(pod)
            return
        if car is None or not car.connected or uid in car.held:
            return
        await self._dispatch(car, pod)

    async def _dispatch(self, car: CarState, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        try:
            assignment = podstatus.admit(pod, list(car.hello.runtimes), nodes.capacity(car.vn, 1))
        except podstatus.Rejection as rej:
            log.info("car %s: pod %s/%s rejected: %s", car.name, pod["metadata"].get("namespace"),
                     pod["metadata"]["name"], rej.message)
            self.metrics.pods_rejected.labels(rej.reason).inc()
            self._queue_status(uid, podstatus.rejected_status(rej.reason, rej.message))
            return
        resume = assignment.resume_from
        digests = [assignment.model.sha256, assignment.input.sha256] + ([resume.sha256] if resume else [])
        token = self.signer.issue_grant(
            digests, ttl=self.settings.grant_ttl_s, upload=True, subject=f"{car.name}/{uid}"
        )
        requests = pod["spec"]["containers"][0].get("resources", {}).get("requests", {}) or {}
        msg = Assign(
            uid=uid,
            namespace=pod["metadata"].get("namespace", "default"),
            name=pod["metadata"]["name"],
            shard=Shard(
                model=ModelRef(digest=assignment.model.sha256, runtime=assignment.model.runtime),
                input=InputRef(
                    digest=assignment.input.sha256,
                    format=assignment.input.format,
                    start=assignment.input.start,
                    end=assignment.input.end,
                ),
                resources=Resources(cpu=str(requests.get("cpu", "1")), memory=str(requests.get("memory", "512Mi"))),
            ),
            grant=Grant(token=token, base_url=self.settings.artifact_base_url),
            resume_from=Checkpoint(digest=resume.sha256, items_done=resume.items_done) if resume else None,
        )
        if await self.link.send(car.name, msg):
            car.held.add(uid)
            log.info("car %s: assigned pod %s/%s", car.name, msg.namespace, msg.name)
            if not pod.get("status", {}).get("containerStatuses"):
                self._queue_status(uid, podstatus.dispatched_status(pod, self.settings.advertise_address))

    async def _finish_deletion(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        path = resource_path("v1", "pods", meta.get("namespace"), meta["name"])
        try:
            async with self._api:
                await self.kube.request(
                    "DELETE", path,
                    body={"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                          "preconditions": {"uid": meta["uid"]}},
                )
        except ApiError as exc:
            if not (exc.not_found or exc.conflict):
                log.warning("pod %s/%s: finishing deletion failed: %s", meta.get("namespace"), meta["name"], exc)

    def _queue_status(self, uid: str, status: dict[str, Any]) -> None:
        self._pending_status[uid] = status  # the latest report wins: writes coalesce
        self._status_wakeup.set()

    async def _status_flusher(self) -> None:
        while True:
            await self._status_wakeup.wait()
            self._status_wakeup.clear()
            batch, self._pending_status = self._pending_status, {}
            await asyncio.gather(*(self._write_pod_status(uid, st) for uid, st in batch.items()))

    async def _write_pod_status(self, uid: str, status: dict[str, Any]) -> None:
        pod = self.pods.get(uid)
        if pod is None:
            return
        meta = pod["metadata"]
        path = resource_path("v1", "pods", meta.get("namespace"), meta["name"], "status")
        try:
            async with self._api:
                updated = await self.kube.patch(path, {"status": status}, content_type=STRATEGIC)
        except ApiError as exc:
            if not exc.not_found:
                log.warning("pod %s/%s: status write failed: %s", meta.get("namespace"), meta["name"], exc)
            return
        if uid in self.pods:
            self.pods[uid] = updated
        if podstatus.is_terminal(updated):
            await self._sync_pod(uid)

    async def _gauge_loop(self) -> None:
        """Refresh the gauges once a second: counting on every event would cost O(cars) per connect and
        O(pods) per status write, quadratic while a fleet registers."""
        while True:
            connected = ready = 0
            for c in self.cars.values():
                connected += c.connected
                ready += c.connected and c.registered
            self.metrics.cars_connected.set(connected)
            self.metrics.nodes_ready.set(ready)
            counts = dict.fromkeys(("Pending", "Running", "Succeeded", "Failed"), 0)
            for pod in self.pods.values():
                phase = pod.get("status", {}).get("phase", "Pending")
                counts[phase] = counts.get(phase, 0) + 1
            for phase, n in counts.items():
                self.metrics.pods.labels(phase).set(n)
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ LinkHandler
    async def car_connected(self, car: str, hello: Hello) -> None:
        # Quick by contract (the link bounds handler time): accept the car, then register it in the background.
        if not self.owns(car):
            log.warning("car %s: served by replica %d, not this one (%d)", car,
                        sharding.owner(car, self.settings.replicas), self.settings.replica)
            return
        body = self.vehiclenodes.get(car)
        if body is None:
            log.warning("car %s: no VehicleNode yet; it is served as soon as its owner registers it", car)
            self._waiting[car] = hello
            return
        self._waiting.pop(car, None)
        try:
            vn = VehicleNode.model_validate(body)
        except ValueError as exc:
            log.warning("car %s: its VehicleNode does not parse (%s); not serving it", car, exc)
            return
        state = self.cars.get(car)
        if state is None:
            state = CarState(name=car, vn=vn, hello=hello)
            self.cars[car] = state
        state.vn, state.hello, state.connected = vn, hello, True
        state.generation += 1
        # Reports about the pods bound to this car are accepted from now on (replays after a shim restart too).
        self.link.set_assignments(car, set(self.pods_by_node.get(car, set())))
        task = asyncio.create_task(self._bring_up(state, hello, state.generation), name=f"bring-up-{car}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _bring_up(self, car: CarState, hello: Hello, generation: int) -> None:
        try:
            await self._register(car)
            if car.generation == generation and car.connected:
                await self._reconcile_held(car, hello)
        except Exception:
            log.exception("car %s: bringing its Node up failed; it will be retried when the car reconnects",
                          car.name)

    async def _reconcile_held(self, car: CarState, hello: Hello) -> None:
        """After (re)connecting: keep what the car holds, re-send what it lost, stop what was deleted."""
        held = {a.uid: a for a in hello.assignments}
        mine = set(self.pods_by_node.get(car.name, set()))
        car.held = set(held) & mine
        car.stopping.clear()
        for uid in held:
            if uid not in mine:
                await self.link.send(car.name, Stop(uid=uid, grace_seconds=0, reason="PodDeleted"))
        for uid in mine:
            await self._sync_pod(uid)

    async def _register(self, car: CarState) -> None:
        """Create the Node once (labels, vehicle taint, status); afterwards only status is applied."""
        now = datetime.now(UTC)
        endpoint = nodes.Endpoint(self.settings.advertise_address, self.settings.kubelet_port)
        status = nodes.node_status(car.vn, endpoint, self.settings.max_pods_per_car, True, "CarConnected",
                                   "the car's link is up and it reports to this shim", now)
        new_node = True
        try:
            async with self._api:
                created = await self.kube.create(
                    resource_path("v1", "nodes"),
                    nodes.node_manifest(car.vn, nodes.hardware_labels(car.vn, self.settings.shim_id), status),
                    fieldManager=FIELD_MANAGER,
                )
            car.node_uid = created["metadata"]["uid"]
        except ApiError as exc:
            new_node = False
            if not exc.conflict:
                raise
            async with self._api:
                applied = await self.kube.apply(
                    resource_path("v1", "nodes", name=car.name, sub="status"),
                    nodes.node_status_apply(car.name, status),
                    FIELD_MANAGER,
                )
            car.node_uid = applied["metadata"]["uid"]
        car.status_written_at = time.monotonic()
        car.registered = True
        if new_node:
            # One write per new car: the Node was created with a fresh Ready heartbeat, which the node lifecycle
            # controller honours until a Lease exists. The Lease is created by the first renewal, at a random
            # point of the first interval, so a fleet coming online does not double the write burst.
            car.lease_exists = False
            self._schedule_lease(car.name, time.monotonic() + random.uniform(0.1, 1.0) * self.settings.lease_renew_interval_s)
        else:
            await self._renew_lease(car, due=time.monotonic())

    async def car_message(self, car: str, msg: CarMessage) -> None:
        state = self.cars.get(car)
        if state is None:
            return
        if isinstance(msg, TelemetryReport):
            self._on_telemetry(state, msg)
        elif isinstance(msg, PodStatus):
            await self._on_pod_status(state, msg)
        elif isinstance(msg, Log):
            self.logs.add(msg.uid, msg.offset, list(msg.lines))

    async def car_disconnected(self, car: str, reason: str) -> None:
        # Quick by contract, like car_connected: the API writes happen in the background.
        self._waiting.pop(car, None)
        state = self.cars.get(car)
        if state is None:
            return
        state.connected = False
        log.info("car %s: link down (%s); its Lease will lapse", car, reason)
        if reason == "replaced":
            return  # a newer connection for the same car follows at once
        task = asyncio.create_task(self._bring_down(state, reason, state.generation), name=f"bring-down-{car}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _bring_down(self, car: CarState, reason: str, generation: int) -> None:
        """The Lease is no longer renewed, so the node lifecycle controller marks the Node NotReady and taints
        it; we also say so at once (unless the car is already back), so no new work waits for the grace period."""
        await asyncio.sleep(self.settings.reconnect_grace_s)  # a blip that heals at once costs no API write
        if car.connected or car.generation != generation:
            return
        now = datetime.now(UTC)
        endpoint = nodes.Endpoint(self.settings.advertise_address, self.settings.kubelet_port)
        status = nodes.node_status(car.vn, endpoint, self.settings.max_pods_per_car, False, "CarLinkLost",
                                   f"the car's link closed ({reason}); work on it is being rescheduled", now)
        try:
            async with self._api:
                await self.kube.apply(resource_path("v1", "nodes", name=car.name, sub="status"),
                                      nodes.node_status_apply(car.name, status), FIELD_MANAGER)
        except ApiError as exc:
            log.warning("car %s: could not mark the Node NotReady: %s", car.name, exc)
        for uid in list(self.pods_by_node.get(car.name, set())):
            pod = self.pods.get(uid)
            if pod is not None and pod["metadata"].get("deletionTimestamp"):
                await self._finish_deletion(pod)

    async def _on_pod_status(self, car: CarState, msg: PodStatus) -> None:
        pod = self.pods.get(msg.uid)
        if pod is None:
            return
        self._queue_status(msg.uid, podstatus.status_from_report(pod, msg, self.settings.advertise_address))
        if msg.phase in ("Succeeded", "Failed"):
            car.held.discard(msg.uid)
            car.stopping.discard(msg.uid)

    # ------------------------------------------------------------------ telemetry
    _URGENT = ("driveState", "pluggedIn", "charging")

    def _on_telemetry(self, car: CarState, msg: TelemetryReport) -> None:
        if car.telemetry is not None:
            self.metrics.telemetry_coalesced.inc()
        car.telemetry = _rounded(msg.telemetry.wire())
        self._telemetry_dirty.add(car.name)
        self._telemetry_wakeup.set()

    def _telemetry_due(self, car: CarState, now: float) -> bool:
        new, old = car.telemetry, car.telemetry_written
        if new is None or new == old:
            return False
        if old is None or any(new.get(k) != old.get(k) for k in self._URGENT):
            return True  # safety-relevant: the operator taints on it, write now
        return now - car.telemetry_written_at >= self.settings.telemetry_min_interval_s

    async def _telemetry_flusher(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._telemetry_wakeup.wait(), timeout=5.0)
            except TimeoutError:
                pass
            self._telemetry_wakeup.clear()
            now = time.monotonic()
            due = []
            for name in list(self._telemetry_dirty):  # only cars with news, not the whole fleet
                car = self.cars.get(name)
                if car is None or car.telemetry == car.telemetry_written:
                    self._telemetry_dirty.discard(name)
                elif self._telemetry_due(car, now):
                    self._telemetry_dirty.discard(name)
                    due.append(car)
                # else: rate-limited; it stays dirty and is looked at again within 5 s
            await asyncio.gather(*(self._write_telemetry(c) for c in due))

    async def _write_telemetry(self, car: CarState) -> None:
        body = car.telemetry
        path = resource_path(API_VERSION, "vehiclenodes", name=car.name, sub="status")
        try:
            async with self._api:
                await self.kube.patch(path, {"status": {"telemetry": body}})
        except ApiError as exc:
            log.warning("car %s: telemetry write failed: %s", car.name, exc)
            self._telemetry_dirty.add(car.name)  # retried on the next pass
            return
        car.telemetry_written, car.telemetry_written_at = body, time.monotonic()
        self.metrics.telemetry_writes.inc()

    # ------------------------------------------------------------------ leases
    def _schedule_lease(self, name: str, due: float) -> None:
        self._lease_due[name] = due
        heapq.heappush(self._lease_heap, (due, name))
        self._lease_wakeup.set()

    async def _renew_lease(self, car: CarState, due: float) -> None:
        """One write: PATCH the renewTime, or POST the Lease the first time (each falls back to the other)."""
        create = not car.lease_exists
        name = car.name
        now = datetime.now(UTC)
        leases = resource_path("coordination.k8s.io/v1", "leases", nodes.NODE_LEASE_NAMESPACE)
        body = nodes.lease_manifest(name, car.node_uid, self.settings.lease_duration_s, now)
        try:
            async with self._api:
                try:
                    if create:
                        await self.kube.create(leases, body)
                    else:
                        await self.kube.patch(f"{leases}/{name}", {"spec": body["spec"]})
                except ApiError as exc:
                    if create and exc.conflict:
                        await self.kube.patch(f"{leases}/{name}", {"spec": body["spec"]})
                    elif not create and exc.not_found:
                        await self.kube.create(leases, body)
                    else:
                        raise
            car.lease_exists = True
            self.metrics.lease_renewals.inc()
            self.metrics.lease_lag.observe(max(0.0, time.monotonic() - due))
        except ApiError as exc:
            log.warning("car %s: lease renewal failed: %s", name, exc)
        # Spread renewals: each car keeps its own phase, so 5,000 cars make a steady trickle, not a burst.
        self._schedule_lease(name, due + self.settings.lease_renew_interval_s)

    async def _lease_loop(self) -> None:
        while True:
            if not self._lease_heap:
                self._lease_wakeup.clear()
                await self._lease_wakeup.wait()
                continue
            due, name = self._lease_heap[0]
            delay = due - time.monotonic()
            if delay > 0:
                self._lease_wakeup.clear()
                try:
                    await asyncio.wait_for(self._lease_wakeup.wait(), timeout=delay)
                except TimeoutError:
                    pass
                continue
            heapq.heappop(self._lease_heap)
            car = self.cars.get(name)
            if car is None or not car.connected or not car.registered:
                continue  # a car that stopped answering lets its Lease lapse
            if self._lease_due.get(name) != due:
                continue  # superseded by a newer schedule (the car re-registered)
            task = asyncio.create_task(self._renew_and_report(car, due))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _renew_and_report(self, car: CarState, due: float) -> None:
        await self._renew_lease(car, due)
        if time.monotonic() - car.status_written_at >= self.settings.status_report_interval_s:
            car.status_written_at = time.monotonic()
            endpoint = nodes.Endpoint(self.settings.advertise_address, self.settings.kubelet_port)
            status = nodes.node_status(car.vn, endpoint, self.settings.max_pods_per_car, True, "CarConnected",
                                       "the car's link is up and it reports to this shim", datetime.now(UTC))
            try:
                async with self._api:
                    await self.kube.apply(resource_path("v1", "nodes", name=car.name, sub="status"),
                                          nodes.node_status_apply(car.name, status), FIELD_MANAGER)
            except ApiError as exc:
                log.warning("car %s: node status report failed: %s", car.name, exc)
