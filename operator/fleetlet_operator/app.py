"""The operator's composition root: builds its parts, joins them, starts and stops them.

kopf runs the process (one replica, standalone: no peering; FleetJobs watched through kopf with stateless
``on.event`` hand-offs; probes; login). Everything else is Fleetlet's own, on the
controller toolkit: the pod and VehicleNode informers (trimmed projections, relist diff), the FleetJob controller
and the VehicleNode controller (keyed work queues with backoff, a deliberate worker count each), the artifact
store, and a metrics endpoint with ``/healthz`` and ``/readyz``.

Construction order has no cycles: API client, informers, VehicleNode controller (the trust view), FleetJob
controller (reads that view; the VehicleNode controller tells it, through a callback, when a car loses trust),
the aggregating Event recorder. ``start`` runs inside kopf's event loop (its startup handler).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import kopf
from aiohttp import web
from prometheus_client import CollectorRegistry

from fleetlet.artifacts import BlobStore
from fleetlet.kube import KubeClient, KubeConfig, RetryPolicy
from fleetlet.kube.events import EventRecorder
from fleetlet.kube.health import health_app

from .artifacts import JobArtifacts
from .jobs import JobController
from .kube import OperatorApi
from .metrics import OperatorMetrics
from .settings import OperatorSettings
from .vehicles import VehicleController

log = logging.getLogger(__name__)


class OperatorApp:
    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.metrics = OperatorMetrics(self.registry)
        self.kube_config = KubeConfig.load(settings.kubeconfig)
        self.kube = KubeClient(self.kube_config, retry=RetryPolicy(timeout_s=settings.api_timeout_s),
                               max_connections=settings.create_concurrency + 16,
                               observer=self.metrics.observe_call)
        self.api = OperatorApi(self.kube)
        self.pods = self.api.pod_informer()
        self.vehiclenodes = self.api.vehiclenode_informer()
        self.car_nodes = self.api.car_node_informer()
        self.vehicles = VehicleController(self.api, self.vehiclenodes, self.pods, self.metrics,
                                          workers=settings.vehicle_workers, nodes=self.car_nodes)
        self.artifacts = JobArtifacts(BlobStore(settings.artifact_dir), file_roots=settings.file_roots)
        self.events = EventRecorder(self.api, self.metrics, component="fleetlet-operator",
                                    instance=socket.gethostname(), observer=self.metrics)
        self.jobs = JobController(self.api, self.artifacts, self.pods, self.vehicles, settings, self.metrics,
                                  self.events)
        self.vehicles.on_untrusted(self.jobs.car_lost_trust)  # a car caught lying: live jobs re-plan at once
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        await self.kube.open()
        await self._serve_metrics()
        for informer in (self.vehiclenodes, self.car_nodes, self.pods):
            self._tasks.append(asyncio.create_task(informer.run(), name=f"informer-{informer.name}"))
        for informer in (self.vehiclenodes, self.car_nodes, self.pods):
            await asyncio.wait_for(informer.synced.wait(), 120)
        for ctl in (self.vehicles.controller, self.jobs.controller, self.events.controller):
            self._tasks.append(asyncio.create_task(ctl.run(), name=f"controller-{ctl.name}"))
        self._tasks.append(asyncio.create_task(self._gauges(), name="gauges"))
        self.ready.set()
        log.info("operator ready: %d VehicleNodes, %d shard pods", len(self.vehiclenodes), len(self.pods))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.kube.close()

    def connection_info(self) -> kopf.ConnectionInfo:
        """kopf's credentials: the same kubeconfig (or in-cluster service account) as Fleetlet's own client."""
        c = self.kube_config
        token = c.bearer()
        return kopf.ConnectionInfo(server=c.server, ca_path=c.ca_file, insecure=c.insecure or None,
                                   certificate_path=c.cert_file, private_key_path=c.key_file,
                                   scheme="Bearer" if token else None, token=token, default_namespace=c.namespace)

    def healthy(self) -> dict[str, Any]:
        return {"ready": self.ready.is_set(), "jobs": len(self.jobs.jobs), "shardPods": len(self.pods)}

    async def _serve_metrics(self) -> None:
        app = health_app(self.registry, self.ready.is_set, "caches not synced yet")
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        s = self.settings
        await web.TCPSite(self._runner, s.metrics_host, s.metrics_port).start()

    async def _gauges(self) -> None:
        while True:
            phases = dict.fromkeys(("Pending", "Running", "Succeeded", "Failed", "Suspended"), 0)
            shards = dict.fromkeys(("total", "pending", "running", "succeeded", "verified", "failed"), 0)
            for body in list(self.jobs.jobs.values()):
                status = body.get("status") or {}
                phases[status.get("phase", "Pending")] = phases.get(status.get("phase", "Pending"), 0) + 1
                if status.get("phase") not in ("Succeeded", "Failed"):
                    for k, v in (status.get("shards") or {}).items():
                        shards[k] = shards.get(k, 0) + int(v)
            for phase, n in phases.items():
                self.metrics.jobs.labels(phase).set(n)
            for state, n in shards.items():
                self.metrics.shards.labels(state).set(n)
            await asyncio.sleep(2.0)
