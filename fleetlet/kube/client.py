"""The one module of Fleetlet that speaks HTTP to the Kubernetes API server.

Never: parse large lists into pydantic models or hold a global session.

Retries: transient failures (connection errors, a body cut off mid-way, 429, 5xx) are retried per the
``RetryPolicy`` for every verb. For a create (POST) that means a lost answer can come back as 409 AlreadyExists for
the object this very call created: every caller treats 409 on create as "it may be mine" (get-or-create,
deterministic names, or server-side apply).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    """An API server answer other than 2xx. ``status`` is the HTTP code, ``reason`` the Status reason."""

    def __init__(self, status: int, reason: str, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body or {}

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def gone(self) -> bool:
        return self.status == 410

    @property
    def forbidden(self) -> bool:
        return self.status == 403

    @property
    def transient(self) -> bool:
        """Worth retrying as is: throttled or a server-side failure."""
        return self.status == 429 or self.status >= 500


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures (connection errors, 429, 5xx, timeouts) are retried: a value, not a global."""

    attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0
    timeout_s: float = 15.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_delay_s)
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))  # full jitter


NO_RETRY = RetryPolicy(attempts=1)


@dataclass
class KubeConfig:
    server: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    token_file: str | None = None
    insecure: bool = False
    namespace: str = "default"
    _tmp: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, context: str | None = None) -> KubeConfig:
        """From ``path``, else $KUBECONFIG, else in-cluster service account, else ~/.kube/config."""
        path = path or os.environ.get("KUBECONFIG")
        if not path and (SERVICE_ACCOUNT_DIR / "token").exists():
            return cls.in_cluster()
        path = path or os.path.expanduser("~/.kube/config")
        return cls.from_file(Path(path), context)

    @classmethod
    def in_cluster(cls) -> KubeConfig:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        ns_file = SERVICE_ACCOUNT_DIR / "namespace"
        return cls(
            server=f"https://{host}:{port}",
            ca_file=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
            token_file=str(SERVICE_ACCOUNT_DIR / "token"),
            namespace=ns_file.read_text().strip() if ns_file.exists() else "default",
        )

    @classmethod
    def from_file(cls, path: Path, context: str | None = None) -> KubeConfig:
        doc = yaml.safe_load(path.read_text())
        ctx_name = context or doc.get("current-context")
        ctx = next(c["context"] for c in doc["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == ctx["cluster"])
        user: dict[str, Any] = next((u["user"] for u in doc.get("users", []) if u["name"] == ctx.get("user")), {})
        cfg = cls(server=cluster["server"].rstrip("/"), namespace=ctx.get("namespace", "default"))
        base = path.parent

        def file_or_data(file_key: str, data_key: str, source: dict[str, Any]) -> str | None:
            if source.get(file_key):
                p = Path(source[file_key])
                return str(p if p.is_absolute() else base / p)
            if source.get(data_key):
                tmp = tempfile.NamedTemporaryFile(delete=False, prefix="fleetlet-kube-")
                tmp.write(base64.b64decode(source[data_key]))
                tmp.close()
                cfg._tmp.append(tmp.name)
                return tmp.name
            return None

        cfg.ca_file = file_or_data("certificate-authority", "certificate-authority-data", cluster)
        cfg.insecure = bool(cluster.get("insecure-skip-tls-verify"))
        cfg.cert_file = file_or_data("client-certificate", "client-certificate-data", user)
        cfg.key_file = file_or_data("client-key", "client-key-data", user)
        cfg.token = user.get("token")
        cfg.token_file = user.get("tokenFile")
        return cfg

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def bearer(self) -> str | None:
        if self.token_file:
            return Path(self.token_file).read_text().strip()  # re-read: projected tokens rotate
        return self.token


@dataclass
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK
    object: dict[str, Any]


def resource_path(
    api_version: str, plural: str, namespace: str | None = None, name: str | None = None, sub: str | None = None
) -> str:
    """``/api/v1/namespaces/ns/pods/name/status`` from its parts (``api_version`` 'v1' or 'group/version')."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [base]
    if namespace:
        parts.append(f"namespaces/{quote(namespace)}")
    parts.append(plural)
    if name:
        parts.append(quote(name))
    if sub:
        parts.append(sub)
    return "/".join(parts)


CallObserver = Callable[[str, str, int, float], None]  # verb, resource, status (0 = transport error), seconds


class KubeClient:
    """One aiohttp session to one API server. Use ``async with KubeClient(cfg) as kube``."""

    def __init__(
        self,
        config: KubeConfig,
        retry: RetryPolicy = RetryPolicy(),
        max_connections: int = 64,
        observer: CallObserver | None = None,
        on_retry: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config = config
        self.retry = retry
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._observer = observer
        self._on_retry = on_retry

    async def __aenter__(self) -> KubeClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=self._max_connections)
            self._session = aiohttp.ClientSession(
                connector=connector, json_serialize=json.dumps, headers={"Accept": "application/json"}
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ core
    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        retry: RetryPolicy | None = None,
    ) -> dict[str, Any]:
        """Send one request, retrying transient failures per ``retry``; returns the decoded JSON body."""
        assert self._session is not None, "use `async with KubeClient(...)` or call open()"
        policy = retry or self.retry
        headers = {"Content-Type": content_type}
        token = self.config.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else (body if isinstance(body, str | bytes) else json.dumps(body))
        resource = _resource_label(path)
        last: Exception | None = None
        for attempt in range(policy.attempts):
            started = time.perf_counter()
            try:
                async with self._session.request(
                    method,
                    self.config.server + path,
                    params=_clean(params),
                    data=data,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=policy.timeout_s),
                ) as resp:
                    raw = await resp.read()
                    self._observe(method, resource, resp.status, started)
                    if resp.status < 300:
                        return json.loads(raw) if raw else {}
                    err = _api_error(resp.status, raw)
                    if resp.status == 429 or resp.status >= 500:
                        last = err
                        retry_after = resp.headers.get("Retry-After")
                        if attempt + 1 < policy.attempts:
                            self._retrying(method, resource)
                            await asyncio.sleep(policy.delay(attempt, float(retry_after) if retry_after else None))
                            continue
                    raise err
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                self._observe(method, resource, 0, started)
                last = exc
                if attempt + 1 < policy.attempts:
                    self._retrying(method, resource)
                    await asyncio.sleep(policy.delay(attempt))
                    continue
        assert last is not None
        raise last

    def _retrying(self, verb: str, resource: str) -> None:
        if self._on_retry is not None:
            self._on_retry(verb, resource)

    def _observe(self, verb: str, resource: str, status: int, started: float) -> None:
        if self._observer is not None:
            self._observer(verb, resource, status, time.perf_counter() - started)

    # ------------------------------------------------------------------ verbs
    async def get(self, path: str, **params: Any) -> dict[str, Any]:
        return await self.request("GET", path, params=params)

    async def list(self, path: str, **params: Any) -> dict[str, Any]:
        return await self.request("GET", path, params=params)

    async def create(self, path: str, body: dict[str, Any], **params: Any) -> dict[str, Any]:
        return await self.request("POST", path, params=params, body=body)

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", path, body=body)

    async def patch(
        self, path: str, body: Any, content_type: str = MERGE, retry: RetryPolicy | None = None, **params: Any
    ) -> dict[str, Any]:
        return await self.request("PATCH", path, params=params, body=body, content_type=content_type, retry=retry)

    async def apply(
        self, path: str, body: dict[str, Any], field_manager: str, force: bool = True, retry: RetryPolicy | None = None
    ) -> dict[str, Any]:
        """Server-side apply under ``field_manager``: each writer owns its fields, nobody clobbers another."""
        return await self.request(
            "PATCH",
            path,
            params={"fieldManager": field_manager, "force": "true" if force else None},
            body=json.dumps(body),
            content_type=APPLY,
            retry=retry,
        )

    async def delete(self, path: str, grace_period_s: int | None = None, **params: Any) -> dict[str, Any]:
        body = None
        if grace_period_s is not None:
            body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": grace_period_s}
        return await self.request("DELETE", path, params=params, body=body)

    async def watch(
        self,
        path: str,
        resource_version: str | None = None,
        timeout_s: int = 290,
        **params: Any,
    ) -> AsyncIterator[WatchEvent]:
        """One watch stream (with bookmarks). Raises ApiError(410) when ``resource_version`` is too old:
        the caller relists. Ends normally when the server closes the stream; the caller re-watches."""
        assert self._session is not None
        query = {
            "watch": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
            "resourceVersion": resource_version,
            **params,
        }
        headers = {}
        token = self.config.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        started = time.perf_counter()
        async with self._session.get(
            self.config.server + path,
            params=_clean(query),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_s + 30),
        ) as resp:
            self._observe("WATCH", _resource_label(path), resp.status, started)
            if resp.status >= 300:
                raise _api_error(resp.status, await resp.read())
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object", {})
                        raise ApiError(
                            int(status.get("code", 500)), status.get("reason", "Error"), status.get("message", "")
                        )
                    yield WatchEvent(event["type"], event["object"])


def _clean(params: dict[str, Any] | None) -> dict[str, str] | None:
    if not params:
        return None
    return {k: str(v) for k, v in params.items() if v is not None}


def _api_error(status: int, raw: bytes) -> ApiError:
    try:
        body = json.loads(raw)
        return ApiError(status, body.get("reason", ""), body.get("message", raw.decode(errors="replace")), body)
    except (ValueError, AttributeError):
        return ApiError(status, "", raw.decode(errors="replace")[:500])


def _resource_label(path: str) -> str:
    """A low-cardinality label for metrics: the resource plural (and subresource), never a name."""
    parts = [p for p in path.split("/") if p]
    # /api/v1/namespaces/ns/pods/name/status  or  /apis/g/v/plural/name
    parts = parts[2:] if parts[0] == "api" else parts[3:]
    if parts and parts[0] == "namespaces" and len(parts) > 2:
        parts = parts[2:]
    if not parts:
        return "namespaces"
    resource = parts[0]
    if len(parts) > 2:
        resource += "/" + parts[2]
    return resource
