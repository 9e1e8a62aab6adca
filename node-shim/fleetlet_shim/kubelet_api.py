"""The kubelet endpoint the API server dials for ``kubectl logs``: one HTTPS listener serves every car's Node
(each Node's ``daemonEndpoints`` points here), as virtual-kubelet does.

Only callers with a client certificate from the cluster CA get in, and each request is authorized with a
SubjectAccessReview (``nodes/proxy`` on the car's Node, what the kubelet checks), cached briefly. Never serves
a log to an unauthenticated caller; ``exec``/``attach``/``portForward`` are refused: car workloads are sandboxed
models, there is nothing to exec into.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from fleetlet.kube import ApiError

from .logs import PodLogs

log = logging.getLogger(__name__)


class PodLookup(Protocol):
    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The pod on one of this shim's cars (a projection with metadata.uid, spec.nodeName, containers)."""
        ...


Authorizer = Callable[[str, list[str], str], Awaitable[bool]]
"""May (user, groups) read logs on this Node? (A SubjectAccessReview for nodes/proxy.)"""


def server_ssl_context(cert_file: str, key_file: str, client_ca_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=client_ca_file)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _subject(peercert: dict[str, Any] | None) -> tuple[str, list[str]]:
    cn, orgs = "", []
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
            elif key == "organizationName":
                orgs.append(value)
    return cn, orgs


class KubeletApi:
    def __init__(self, pods: PodLookup, logs: PodLogs, authorize: Authorizer, cache_s: float = 60.0) -> None:
        self.pods = pods
        self.logs = logs
        self.authorize = authorize
        self.cache_s = cache_s
        self._allowed: dict[tuple[str, str], float] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._logs)
        for verb in ("exec", "attach", "portForward", "run"):
            app.router.add_route("*", f"/{verb}/{{tail:.*}}", self._unsupported)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _unsupported(self, request: web.Request) -> web.Response:
        return web.Response(status=501, text="cars run sandboxed models only: exec, attach and port-forward "
                                              "are not supported; use kubectl logs\n")

    async def _authorize(self, request: web.Request, node: str) -> web.Response | None:
        ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        user, groups = _subject(ssl_obj.getpeercert() if ssl_obj else None)
        if not user:
            return web.Response(status=401, text="a client certificate from the cluster CA is required\n")
        key = (user, node)
        if self._allowed.get(key, 0.0) > time.monotonic():
            return None
        try:
            allowed = await self.authorize(user, groups, node)
        except (ApiError, OSError, TimeoutError) as exc:
            log.warning("SubjectAccessReview for %s on %s failed: %s", user, node, exc)
            return web.Response(status=503, text="cannot authorize the request right now\n")
        if not allowed:
            return web.Response(status=403, text=f"user {user!r} may not read logs on node {node!r}\n")
        self._allowed[key] = time.monotonic() + self.cache_s
        return None

    async def _logs(self, request: web.Request) -> web.Response:
        ns, name, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        pod = self.pods.pod(ns, name)
        if pod is None:
            return web.Response(status=404, text=f"pod {ns}/{name} is not on a car this shim serves\n")
        denied = await self._authorize(request, pod["spec"]["nodeName"])
        if denied is not None:
            return denied
        names = [c.get("name") for c in pod["spec"].get("containers", [])]
        if container not in names:
            return web.Response(status=404, text=f"container {container!r} is not in pod {ns}/{name}\n")
        lines = self.logs.get(pod["metadata"]["uid"])
        tail = request.query.get("tailLines")
        if tail is not None:
            try:
                n = int(tail)
            except ValueError:
                return web.Response(status=400, text="tailLines must be an integer\n")
            lines = lines[-n:] if n > 0 else []
        body = "".join(line + "\n" for line in lines)
        limit = request.query.get("limitBytes")
        if limit and limit.isdigit():
            body = body[: int(limit)]
        return web.Response(text=body, content_type="text/plain")
