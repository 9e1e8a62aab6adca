"""The endpoint every Fleetlet component serves on its metrics address: ``/metrics`` (Prometheus), ``/healthz``
(the event loop answers: the process is alive) and ``/readyz`` (caches synced and listeners up), all without
credentials, as Kubernetes probes and scrapers expect."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest


def health_app(registry: CollectorRegistry, ready: Callable[[], bool], not_ready: str) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"{not_ready}\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
