"""The shim's composition root: builds its parts, joins them with small interfaces, runs them, stops them.

The parts, each with one job (virtual-kubelet's seams):
- ``kube.ShimApi``: the only module that talks to the API server; informers for VehicleNodes, car Nodes,
  bound pods and the car revocation list, each holding trimmed projections.
- ``cars.CarRegistry``: the link's handler; who is connected, what each car said and holds.
- ``link.LinkServer``: the cars' TLS WebSockets (and the artifact store on the same listener).
- controllers, each a ``sync(key)`` run by the toolkit's ``Controller``: ``nodes`` (registration, Ready),
  ``leases`` (heartbeats), ``carstate`` (the owner's rules as taints, labels, cordon), ``telemetry``
  (VehicleNode status), ``pods`` (dispatch, status, deletion) and ``events``.
- ``kubelet_api.KubeletApi``: ``kubectl logs`` for every car.

Construction has no cycles: informers, registry, link (the registry is its handler), controllers (the link is
their ``CarChannel``), then one ``_Hub`` subscribed to the registry turns car events into queued keys.
Nothing is served to cars before the caches are synced, so a restart never acts on a partial view.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from typing import Any

from prometheus_client import CollectorRegistry

from fleetlet.artifacts import GrantSigner
from fleetlet.carlink.protocol import PodStatus
from fleetlet.kube import Backoff, Change, Controller, KubeClient
from fleetlet.kube.events import EventRecorder

from . import sharding
from .cars import CarRegistry
from .carstate import CarStateController
from .kube import ShimApi
from .leases import LeaseController
from .link.credentials import parse_revocations
from .link.server import LinkConfig, LinkServer
from .logs import PodLogs
from .metrics import ShimMetrics
from .nodes import NodeController
from .pods import PodController, index_pods, owns_report
from .settings import ShimSettings
from .telemetry import TelemetryMirror

log = logging.getLogger(__name__)
SYNC_TIMEOUT_S = 120.0


class Shim:
    def __init__(self, kube: KubeClient, signer: GrantSigner, metrics: ShimMetrics, settings: ShimSettings,
                 link_ssl: ssl.SSLContext, link_config: LinkConfig, prometheus: CollectorRegistry) -> None:
        self.settings = settings
        self.metrics = metrics
        self.api = api = ShimApi(kube, settings.namespace)
        self.vehiclenodes = api.vehiclenode_informer(keep=lambda o: self.owns(o["metadata"]["name"]))
        self.nodes = api.node_informer(keep=lambda o: o["metadata"]["name"] in self.vehiclenodes)
        self.pods = api.pod_informer(keep=lambda o: o.get("spec", {}).get("nodeName", "") in self.vehiclenodes)
        self.revocations = api.revocation_informer()
        index_pods(self.pods)
        self.logs = PodLogs(settings.log_lines_per_pod)
        self.cars = CarRegistry(self.vehiclenodes, self.logs)
        self.link = LinkServer(self.cars, link_ssl, config=link_config, registry=prometheus,
                               placement=self._placement,
                               authorize_report=lambda car, uid: owns_report(self.pods, car, uid))
        workers = settings.workers

        def controller(name: str, sync: Any, backoff: Backoff | None = None) -> Controller:
            return Controller(name, sync, workers=workers[name], backoff=backoff, sync_timeout_s=SYNC_TIMEOUT_S,
                              observer=metrics)

        self.events = EventRecorder(api, metrics, component="fleetlet-shim", instance=settings.shim_id,
                                    observer=metrics, workers=workers["events"])
        self.lease_sync = LeaseController(api, self.cars, self.nodes, settings, metrics)
        # A failed renewal is retried within seconds: the lease duration leaves room for little more.
        self.lease_ctl = controller("leases", self.lease_sync.sync, Backoff(base_s=0.5, cap_s=5.0))
        self.node_ctl = controller("nodes", NodeController(api, self.cars, self.nodes, settings, self.events,
                                                           self._enqueue_lease).sync)
        self.telemetry = TelemetryMirror(api, self.cars, settings, metrics)
        self.telemetry_ctl = controller("telemetry", self.telemetry.sync)
        self.carstate_ctl = controller("carstate", CarStateController(
            api, self.cars, self.nodes, self.link, self.events, metrics, self._conditions_changed).sync)
        self.pod_sync = PodController(api, self.cars, self.pods, self.link, signer, self.logs, settings, metrics,
                                      observer=metrics)
        self.cars.subscribe(_Hub(self))
        self.nodes.add_handler(self._node_changed)
        self.revocations.add_handler(self._revocations_changed)
        self._tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def owns(self, car: str) -> bool:
        return sharding.owns(car, self.settings.replica, self.settings.replicas)

    async def start(self, sync_timeout_s: float = 120.0) -> None:
        """Sync the caches (VehicleNodes first: the other caches keep only this replica's cars), then run the
        controllers. The caller starts the link after this returns."""
        def run(name: str, coro: Any) -> None:
            self._tasks.append(asyncio.create_task(coro, name=name))

        run("informer-vehiclenodes", self.vehiclenodes.run())
        await asyncio.wait_for(self.vehiclenodes.synced.wait(), sync_timeout_s)
        run("informer-nodes", self.nodes.run())
        run("informer-revocations", self.revocations.run())
        run("informer-pods", self.pods.run())
        for informer in (self.nodes, self.revocations, self.pods):
            await asyncio.wait_for(informer.synced.wait(), sync_timeout_s)
        for ctl in (self.lease_ctl, self.node_ctl, self.telemetry_ctl, self.carstate_ctl,
                    self.pod_sync.controller, self.events.controller):
            run(f"controller-{ctl.name}", ctl.run())
        run("gauges", self._gauges())
        log.info("caches synced: %d VehicleNodes, %d car Nodes, %d pods on cars", len(self.vehiclenodes),
                 len(self.nodes), len(self.pods))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # ---- wiring --------------------------------------------------------------------------------------------

    def _placement(self, car: str) -> tuple[int, str | None] | None:
        s = self.settings
        owner = sharding.owner(car, s.replicas)
        if owner == s.replica:
            return None
        return owner, (s.replica_urls[owner] if owner < len(s.replica_urls) else None)

    def _enqueue_lease(self, car: str, delay_s: float) -> None:
        self.lease_ctl.enqueue_after(car, self.lease_sync.schedule(car, delay_s))

    def _conditions_changed(self, car: str) -> None:
        self.telemetry.mark(car, urgent=True)
        self.telemetry_ctl.enqueue(car)

    def _node_changed(self, change: Change) -> None:
        # Someone (the node lifecycle controller, a user, we) wrote the Node: look again at what we own of it.
        self.node_ctl.enqueue(change.key)
        self.carstate_ctl.enqueue(change.key)

    def _revocations_changed(self, change: Change) -> None:
        cars, serials = parse_revocations(None if change.type == "DELETED" else change.obj)
        log.info("car revocation list: %d cars, %d certificate serials", len(cars), len(serials))
        self.link.set_revoked(cars, serials)

    async def _gauges(self) -> None:
        """Refresh the gauges once a second: counting on every event would cost O(cars) per connect."""
        while True:
            connected = ready = 0
            for car in self.cars:
                connected += car.connected
                ready += car.connected and car.name in self.nodes
            self.metrics.cars_connected.set(connected)
            self.metrics.nodes_ready.set(ready)
            phases: Counter[str] = Counter({"Pending": 0, "Running": 0, "Succeeded": 0, "Failed": 0})
            for _, pod in self.pods.items():
                phases[pod.get("status", {}).get("phase", "Pending")] += 1
            for phase, n in phases.items():
                self.metrics.pods.labels(phase).set(n)
            await asyncio.sleep(1.0)


class _Hub:
    """Turns the registry's car events into queued keys (``CarEvents``)."""

    def __init__(self, shim: Shim) -> None:
        self._shim = shim

    def car_changed(self, car: str) -> None:
        s = self._shim
        s.node_ctl.enqueue(car)
        s.carstate_ctl.enqueue(car)
        s.telemetry_ctl.enqueue(car)

    def car_telemetry(self, car: str, urgent: bool) -> None:
        s = self._shim
        s.carstate_ctl.enqueue(car)  # a threshold crossing reaches the Node at once
        s.telemetry.mark(car, urgent)
        s.telemetry_ctl.enqueue(car)

    def car_pods(self, car: str) -> None:
        self._shim.pod_sync.enqueue_car(car)

    def pod_report(self, car: str, report: PodStatus) -> None:
        self._shim.pod_sync.report(car, report)
