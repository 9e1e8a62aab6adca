"""A fault-injecting reverse proxy in front of a real Kubernetes API server: test infrastructure only.

What it is for: proving that Fleetlet's controllers lose nothing when the API server misbehaves (errors, 429s,
dropped connections, slow answers, watches that end or expire) against the *real* API server, instead of
mocking it. A test starts a ``FaultProxy`` from an admin kubeconfig, points the code under test at
``proxy.kubeconfig(path)`` (in-process ``KubeClient`` or a subprocess such as the shim with ``--kubeconfig``),
adds fault rules while it runs and asserts on the proxy's record of requests.
Production code never imports it.

Downstream the proxy speaks plain HTTP on 127.0.0.1 with no authentication: it is loopback-only test
infrastructure, and every request it forwards carries the identity (client certificate, or bearer token) of
the kubeconfig user it was given. Upstream it speaks TLS and trusts that kubeconfig's CA. Requests and answers
pass through unchanged apart from hop-by-hop headers; watches and other chunked answers stream through
chunk by chunk, never buffered. Protocol upgrades (exec, port-forward) are not supported.

The proxy runs its own event loop in a background thread, so it serves both synchronous tests and subprocesses
and never blocks an asyncio test: every method but ``start``/``stop`` only takes a short lock (use
``async with FaultProxy(...)`` to start and stop it off the test's loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from fleetlet.kube.client import KubeConfig

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection", "TE",
        "Trailer", "Trailers", "Transfer-Encoding", "Upgrade",
    )
)
# Not forwarded either: Host names the proxy; lengths are recomputed; the upstream is asked for identity
# encoding so that watch events can be counted and cut at line boundaries.
_REQUEST_DROP = _HOP_BY_HOP | {"host", "content-length", "accept-encoding"}
_RESPONSE_DROP = _HOP_BY_HOP | {"content-length"}
# The reasons the API server puts in a Status for these codes.
_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
    410: "Expired", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
    503: "ServiceUnavailable", 504: "Timeout",
}


# ---------------------------------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Respond:
    """Answer ``status`` with an API-server-style Status body, without forwarding the request.

    ``retry_after_s`` sets ``Retry-After`` (and ``details.retryAfterSeconds``), as the API server does on 429.
    ``in_stream`` (watches only) answers HTTP 200 and then one ``ERROR`` watch event carrying the Status, then
    ends the stream: how the API server reports a 410 for a watch whose resourceVersion has expired.
    """

    status: int
    retry_after_s: float | None = None
    in_stream: bool = False
    reason: str | None = None
    message: str = "injected by FaultProxy"


@dataclass(frozen=True)
class Drop:
    """Close the connection without an answer. ``after_forward``: first forward the request and read the
    upstream's answer, so the API server applied the write but the client never hears back. ``partial``
    (with ``after_forward``): send the answer's status, headers and half its body first (a truncated
    answer)."""

    after_forward: bool = False
    partial: bool = False


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds`` before forwarding (the client's own timeout may fire first)."""

    seconds: float


@dataclass(frozen=True)
class CutWatch:
    """End a watch stream after ``after_s`` seconds and/or ``after_events`` events (whichever comes first).
    Clean by default (the stream ends as on the server's timeout); ``abrupt`` closes the socket mid-stream."""

    after_s: float | None = None
    after_events: int | None = None
    abrupt: bool = False


Fault = Respond | Drop | Delay | CutWatch


@dataclass
class Rule:
    """A fault applied to matching requests. ``hits`` counts the requests it affected."""

    fault: Fault
    method: str | None
    path: re.Pattern[str]
    watch: bool | None
    times: int | None
    probability: float
    name: str
    hits: int = 0

    def matches(self, method: str, path: str, watch: bool) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method != method:
            return False
        watch_only = self.watch or isinstance(self.fault, CutWatch) or (
            isinstance(self.fault, Respond) and self.fault.in_stream
        )
        if (watch_only and not watch) or (self.watch is False and watch):
            return False
        return self.path.search(path) is not None


@dataclass
class Exchange:
    """One request the proxy received. ``status`` is what the client got: None while in flight, 0 when the
    connection was closed without a (complete) answer. ``upstream_status`` is what the API server answered
    (None when the request was not forwarded). ``events`` counts the lines (watch events) streamed to the
    client."""

    method: str
    path: str
    query: str
    watch: bool
    fault: str | None = None
    status: int | None = None
    upstream_status: int | None = None
    events: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Stream:
    """An open streamed answer, so that ``cut_watches`` can end it."""

    cut: asyncio.Event = field(default_factory=asyncio.Event)
    abrupt: bool = False

    def end(self, abrupt: bool) -> None:
        self.abrupt = self.abrupt or abrupt
        self.cut.set()


# ---------------------------------------------------------------------------------------------------- proxy


class FaultProxy:
    """A reverse proxy to the API server of ``kubeconfig`` (acting as ``user``, default the context's user)
    that injects faults by rule. See the module docstring; ``start()``/``stop()`` or use as a context manager.
    """

    def __init__(
        self,
        kubeconfig: str | Path,
        user: str | None = None,
        *,
        context: str | None = None,
        port: int = 0,
        seed: int = 0,
    ) -> None:
        config = _upstream_config(Path(kubeconfig), user, context)
        self.upstream = config.server
        self.namespace = config.namespace
        self._ssl = config.ssl_context()
        self._bearer = config.bearer
        for tmp in config._tmp:  # certificate data the parser wrote out: loaded now, not needed any more
            Path(tmp).unlink(missing_ok=True)
        self._requested_port = port
        self.port = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._records: list[Exchange] = []
        self._streams: set[_Stream] = set()
        self._watches_open = 0
        self._rule_seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("the proxy is not started")
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> FaultProxy:
        """Listen on 127.0.0.1 and serve from a background thread: on the port given, else a free one; after
        a ``stop()`` on the same port as before, so that clients reconnect (an API server outage and back)."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, self._requested_port or self.port))
        self.port = int(sock.getsockname()[1])
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open(sock))
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
                loop.run_until_complete(self._close())
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure or not ready.is_set():
            self._thread.join(5)
            self._thread = self._loop = None
            sock.close()
            raise RuntimeError("the fault proxy did not start") from (failure[0] if failure else None)
        log.info("fault proxy %s -> %s", self.url, self.upstream)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """End every open stream and connection and stop the thread. Rules and records are kept, and
        ``start()`` serves again on the same port."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already ended
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("fault proxy %s: its thread did not end within %.0fs", self.url, timeout_s)
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FaultProxy:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def kubeconfig(self, path: str | Path) -> Path:
        """Write a kubeconfig for the proxy (plain HTTP, no credentials needed) to ``path``; return it."""
        path = Path(path)
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "faultproxy", "cluster": {"server": self.url}}],
            "users": [{"name": "faultproxy", "user": {}}],
            "contexts": [
                {
                    "name": "faultproxy",
                    "context": {"cluster": "faultproxy", "user": "faultproxy", "namespace": self.namespace},
                }
            ],
            "current-context": "faultproxy",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    # ------------------------------------------------------------------------------------------- rules
    def add(
        self,
        fault: Fault,
        *,
        method: str | None = None,
        path: str = "",
        watch: bool | None = None,
        times: int | None = None,
        probability: float = 1.0,
        name: str | None = None,
    ) -> Rule:
        """Apply ``fault`` to requests with ``method`` (None: any) whose path matches the regex ``path``
        (searched, not anchored; '' matches all), limited to watches (``watch=True``) or to everything else
        (``watch=False``); at most ``times`` requests (None: unlimited), each with ``probability`` (drawn from
        the proxy's seeded RNG). ``CutWatch`` and in-stream ``Respond`` rules only ever match watches.
        Rules are tried in the order added and the first that matches wins: one fault per request."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability {probability} is not within [0, 1]")
        with self._lock:
            self._rule_seq += 1
            rule = Rule(
                fault=fault,
                method=method.upper() if method else None,
                path=re.compile(path),
                watch=watch,
                times=times,
                probability=probability,
                name=name or f"#{self._rule_seq}",
            )
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear(self) -> None:
        """Remove every rule."""
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    @property
    def faults_hit(self) -> dict[str, int]:
        """How many requests each current rule affected, by rule name."""
        with self._lock:
            return {r.name: r.hits for r in self._rules}

    def cut_watches(self, abrupt: bool = False) -> int:
        """End every open streamed answer now (cleanly, or by closing the socket); return how many.
        Clients see their watch end and must resume it."""
        with self._lock:
            streams = list(self._streams)
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # stopping: its streams end anyway
                for stream in streams:
                    loop.call_soon_threadsafe(stream.end, abrupt)
        return len(streams)

    @property
    def open_watches(self) -> int:
        """Watch streams being served right now."""
        with self._lock:
            return self._watches_open

    async def wait_watches(self, n: int = 1, timeout_s: float = 10.0) -> None:
        """Wait (without blocking the caller's loop) until at least ``n`` watches are open."""
        deadline = time.monotonic() + timeout_s
        while self.open_watches < n:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.open_watches} watches open through the proxy after {timeout_s}s, not {n}"
                )
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------------------------------- records
    @property
    def requests(self) -> list[Exchange]:
        """A snapshot of every request received, oldest first."""
        with self._lock:
            return [replace(r) for r in self._records]

    def reset_records(self) -> None:
        with self._lock:
            self._records.clear()

    def count(
        self,
        method: str | None = None,
        path: str | None = None,
        status: int | None = None,
        *,
        watch: bool | None = None,
        fault: bool | str | None = None,
    ) -> int:
        """Requests with ``method`` whose path matches the regex ``path``, answered ``status`` (0: dropped),
        that were (not) watches, and that a fault hit (``True``), none hit (``False``) or the rule so named
        hit (a name)."""

        def wanted(r: Exchange) -> bool:
            if (fault is True and r.fault is None) or (fault is False and r.fault is not None):
                return False
            return (
                (method is None or r.method == method.upper())
                and (path is None or re.search(path, r.path) is not None)
                and (status is None or r.status == status)
                and (watch is None or r.watch == watch)
                and (not isinstance(fault, str) or r.fault == fault)
            )

        with self._lock:
            return sum(1 for r in self._records if wanted(r))

    # ------------------------------------------------------------------------------------------- serving
    async def _open(self, sock: socket.socket) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl, limit=0),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that goes away ends its upstream request (and watch) at once.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def _close(self) -> None:
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.end(abrupt=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def _pick(self, method: str, path: str, watch: bool) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path, watch) and (
                    rule.probability >= 1.0 or self._rng.random() < rule.probability
                ):
                    rule.hits += 1
                    return rule
        return None

    def _update(self, record: Exchange, **values: Any) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(record, key, value)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        watch = _is_watch(request)
        record = Exchange(request.method, request.path, request.query_string, watch)
        with self._lock:
            self._records.append(record)
        rule = self._pick(request.method, request.path, watch)
        fault = rule.fault if rule else None
        if rule is not None:
            self._update(record, fault=rule.name)
            log.info("fault proxy: %s %s%s -> rule %s: %r", request.method, request.path,
                     " (watch)" if watch else "", rule.name, fault)
        try:
            if isinstance(fault, Delay):
                await asyncio.sleep(fault.seconds)
            if isinstance(fault, Drop) and not fault.after_forward:
                return self._drop(request, record)
            if isinstance(fault, Respond):
                return await self._respond(request, record, fault)
            return await self._forward(request, record, fault)
        finally:
            if record.status is None:  # dropped, or the client went away first
                self._update(record, status=0)

    async def _forward(
        self, request: web.Request, record: Exchange, fault: Fault | None
    ) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = _forwarded_headers(request.headers)
        if "Authorization" not in headers and (token := self._bearer()):
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with self._session.request(
                request.method,
                URL(self.upstream + request.raw_path, encoded=True),
                data=body or None,
                headers=headers,
                allow_redirects=False,
            ) as upstream:
                self._update(record, upstream_status=upstream.status)
                if isinstance(fault, Drop):  # after_forward: the API server acted, the client never knows
                    payload = await upstream.read()
                    if fault.partial:
                        self._update(record, status=0)
                        answer = web.StreamResponse(
                            status=upstream.status, headers=_answer_headers(upstream.headers)
                        )
                        answer.content_length = len(payload)
                        await answer.prepare(request)
                        await answer.write(payload[: len(payload) // 2])
                    return self._drop(request, record)
                if record.watch or "chunked" in upstream.headers.get("Transfer-Encoding", "").lower():
                    return await self._stream(request, record, upstream, fault)
                payload = await upstream.read()
                self._update(record, status=upstream.status)
                return web.Response(
                    status=upstream.status, body=payload, headers=_answer_headers(upstream.headers)
                )
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            if record.status is not None:  # already streaming: the upstream broke mid-answer, so do we
                return self._drop(request, record)
            log.warning("fault proxy: upstream %s failed: %r", self.upstream, exc)
            self._update(record, status=502)
            failure = _status_body(502, "BadGateway", f"fault proxy: upstream: {exc!r}")
            return web.json_response(failure, status=502)

    async def _stream(
        self, request: web.Request, record: Exchange, upstream: aiohttp.ClientResponse, fault: Fault | None
    ) -> web.StreamResponse:
        answer = web.StreamResponse(status=upstream.status, headers=_answer_headers(upstream.headers))
        answer.enable_chunked_encoding()
        await answer.prepare(request)
        self._update(record, status=upstream.status)
        cut = fault if isinstance(fault, CutWatch) else CutWatch()
        stream = _Stream()
        with self._lock:
            self._streams.add(stream)
            self._watches_open += int(record.watch)
        pump = asyncio.create_task(self._pump(upstream, answer, record, cut.after_events))
        cutter = asyncio.create_task(stream.cut.wait())
        try:
            await asyncio.wait({pump, cutter}, timeout=cut.after_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pump.cancel()
            cutter.cancel()
            with self._lock:
                self._streams.discard(stream)
                self._watches_open -= int(record.watch)
            finished = pump.done() and not pump.cancelled()
            failed = finished and pump.exception() is not None
            ended_upstream = finished and not failed and not pump.result()
            if not ended_upstream and upstream.connection and upstream.connection.transport:
                upstream.connection.transport.abort()  # the rest is not wanted: close now, no TLS goodbye
        if failed:
            return self._drop(request, record)  # the client went away, or the upstream broke mid-stream
        if not ended_upstream and (stream.abrupt or cut.abrupt):
            return self._drop(request, record)
        with contextlib.suppress(ConnectionError):
            await answer.write_eof()
        return answer

    async def _pump(
        self,
        upstream: aiohttp.ClientResponse,
        answer: web.StreamResponse,
        record: Exchange,
        max_events: int | None,
    ) -> bool:
        """Copy the upstream stream as it arrives; True when it was cut after ``max_events`` lines."""
        async for chunk in upstream.content.iter_any():
            data, limited = chunk, False
            if max_events is not None:
                data, limited = _take_lines(chunk, max_events - record.events)
            self._update(record, events=record.events + data.count(b"\n"))
            await answer.write(data)
            if limited:
                return True
        return False

    async def _respond(self, request: web.Request, record: Exchange, fault: Respond) -> web.StreamResponse:
        phrase = HTTPStatus(fault.status).phrase.replace(" ", "")
        reason = fault.reason or _REASONS.get(fault.status, phrase)
        body = _status_body(fault.status, reason, fault.message)
        headers: dict[str, str] = {}
        if fault.retry_after_s is not None:
            headers["Retry-After"] = f"{fault.retry_after_s:g}"
            body["details"] = {"retryAfterSeconds": int(fault.retry_after_s)}
        if fault.in_stream:
            self._update(record, status=200, events=1)  # recorded before the client can see it
            answer = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            answer.enable_chunked_encoding()
            await answer.prepare(request)
            await answer.write(json.dumps({"type": "ERROR", "object": body}).encode() + b"\n")
            await answer.write_eof()
            return answer
        self._update(record, status=fault.status)
        return web.json_response(body, status=fault.status, headers=headers)

    def _drop(self, request: web.Request, record: Exchange) -> web.StreamResponse:
        """Close the client's connection now, without (the rest of) an answer."""
        if record.status is None:
            self._update(record, status=0)
        if request.transport is not None:
            request.transport.abort()
        return web.Response()  # never sent: aiohttp finds the transport closed


# ---------------------------------------------------------------------------------------------------- helpers


def _upstream_config(path: Path, user: str | None, context: str | None) -> KubeConfig:
    """The upstream server and identity: ``context`` (default current) of the kubeconfig, as ``user``."""
    if user is None:
        return KubeConfig.from_file(path, context)
    doc = yaml.safe_load(path.read_text())
    ctx_name = context or doc.get("current-context")
    ctx = next(c["context"] for c in doc["contexts"] if c["name"] == ctx_name)
    if not any(u["name"] == user for u in doc.get("users", [])):
        raise ValueError(f"{path} has no user {user!r}")
    for entry in [c["cluster"] for c in doc["clusters"]] + [u["user"] for u in doc["users"]]:
        for key in ("certificate-authority", "client-certificate", "client-key", "tokenFile"):
            if entry.get(key):  # the copy lives elsewhere: make relative paths absolute
                entry[key] = str(path.parent / entry[key])
    doc["contexts"].append({"name": "faultproxy-upstream", "context": {**ctx, "user": user}})
    with tempfile.TemporaryDirectory(prefix="faultproxy-") as tmp:
        copy = Path(tmp) / "kubeconfig"
        copy.write_text(yaml.safe_dump(doc))
        return KubeConfig.from_file(copy, "faultproxy-upstream")


def _is_watch(request: web.Request) -> bool:
    return request.query.get("watch", "").lower() in ("true", "1") or "/watch/" in request.path


def _without(headers: Iterable[tuple[str, str]], drop: frozenset[str], connection: str) -> CIMultiDict[str]:
    named = {h.strip().lower() for h in connection.split(",") if h.strip()}  # headers listed in Connection
    return CIMultiDict((k, v) for k, v in headers if k.lower() not in drop and k.lower() not in named)


def _forwarded_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    out = _without(headers.items(), _REQUEST_DROP, headers.get("Connection", ""))
    out["Accept-Encoding"] = "identity"
    return out


def _answer_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return _without(headers.items(), _RESPONSE_DROP, headers.get("Connection", ""))


def _take_lines(chunk: bytes, n: int) -> tuple[bytes, bool]:
    """The first ``n`` newline-terminated lines of ``chunk``, and whether it held all ``n`` of them."""
    if n <= 0:
        return b"", True
    end = -1
    for _ in range(n):
        end = chunk.find(b"\n", end + 1)
        if end < 0:
            return chunk, False
    return chunk[: end + 1], True


def _status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
