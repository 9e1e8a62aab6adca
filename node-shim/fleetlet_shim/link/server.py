"""The car link server: cars dial in over TLS WebSockets, and the shim talks to each as a named peer.

One process serves thousands of cars. For each connection the server proves who the car is (its fleet-CA
certificate's CN; see ``credentials``), reads its ``hello``, sends a car that another replica serves to that
replica (``redirect``), then hands each valid message to the shim's ``LinkHandler`` and writes the shim's
messages through a bounded per-car queue. It refuses (with an ``error`` reply and a counter) any message that is
malformed, oversized, of an unknown type, names another car or concerns another car's assignment (the shim's
``authorize_report`` says whose it is); a car that keeps doing so is disconnected. Liveness is a
WebSocket ping sent only when a car has been quiet for ``heartbeat_seconds``; a car silent for
``dead_after_seconds`` is dropped. A second connection for a car replaces the first; revoking a car closes
its connection at once.

It must never let one car affect another (no shared await on a car's socket, no exception escaping a
connection), never trust a car name it did not read from a certificate, never block on a slow car, and never
touch the Kubernetes API (that is the shim's job, through the handler).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import BaseModel

from fleetlet.carlink import protocol
from fleetlet.carlink.protocol import (
    CarMessage,
    Error,
    Hello,
    Log,
    PodStatus,
    ProtocolError,
    Redirect,
    Refusal,
    ShimMessage,
    Welcome,
)

from .credentials import CarIdentity, CredentialError, Revocations, identity_from_peercert

log = logging.getLogger(__name__)

# Application close codes (4000-4999 are ours); the car's client logs them.
CLOSE_REPLACED = 4000
CLOSE_BAD_HELLO = 4001
CLOSE_REDIRECT = 4002
CLOSE_REVOKED = 4003
CLOSE_VIOLATIONS = 4008
CLOSE_SLOW = 4009
CLOSE_SHUTDOWN = int(WSCloseCode.GOING_AWAY)


class LinkHandler(Protocol):
    """What the shim implements. Calls for one car never overlap and come in order: connected, messages,
    disconnected. A connection that replaces another is reported as ``car_disconnected(car, "replaced")``
    followed by ``car_connected``. Exceptions and calls running past ``handler_timeout_seconds`` are logged and
    swallowed (the car stays connected), so a handler should be quick and hand slow work off.
    """

    async def car_connected(self, car: str, hello: Hello) -> None: ...

    async def car_message(self, car: str, msg: CarMessage) -> None: ...

    async def car_disconnected(self, car: str, reason: str) -> None: ...


@dataclass(frozen=True)
class LinkConfig:
    path: str = "/v1/link"
    max_message_bytes: int = protocol.MAX_MESSAGE_BYTES
    # Frames up to this size are read and refused politely; bigger ones make aiohttp close the socket (1009).
    max_frame_bytes: int = 4 * protocol.MAX_MESSAGE_BYTES
    heartbeat_seconds: float = 30.0
    dead_after_seconds: float = 45.0
    hello_timeout_seconds: float = 10.0
    send_queue: int = 256
    send_timeout_seconds: float = 10.0
    close_timeout_seconds: float = 5.0
    handler_timeout_seconds: float = 10.0
    violation_limit: int = 10
    violation_window_seconds: float = 60.0
    telemetry_refresh_seconds: float = 300.0
    # Plaintext read buffer per TLS connection. CPython's asyncio gives every TLS connection 256 KiB, which
    # made up ~80 % of the server's memory per idle car (bench/bench_carlink.py); car-link frames are small
    # and a TLS record holds at most 16 KiB of plaintext, so one record per read costs nothing in speed.
    # bench_shim.py --memory-only (link alone, 500 cars): 91.8 KiB per car at 32 KiB, 75.9 at 16 KiB.
    # 0 keeps asyncio's default.
    tls_read_buffer_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        if self.dead_after_seconds <= self.heartbeat_seconds:
            raise ValueError("dead_after_seconds must exceed heartbeat_seconds (a ping needs time to come back)")
        if self.max_frame_bytes < self.max_message_bytes:
            raise ValueError("max_frame_bytes must be at least max_message_bytes")


@dataclass
class LinkMetrics:
    """Plain counters, cheap on the hot path; ``collector()`` exposes them to a Prometheus registry."""

    messages_in: Counter[str] = field(default_factory=Counter)  # by message type
    messages_out: Counter[str] = field(default_factory=Counter)  # by message type (queued)
    refused: Counter[str] = field(default_factory=Counter)  # by Refusal
    connections: int = 0  # accepted (hello done)
    connections_refused: Counter[str] = field(default_factory=Counter)  # by reason
    disconnects: Counter[str] = field(default_factory=Counter)  # by reason
    send_dropped: Counter[str] = field(default_factory=Counter)  # by reason (queueFull, notConnected)
    bytes_in: int = 0  # WebSocket message payload bytes (TLS and framing not included)
    bytes_out: int = 0
    pings_out: int = 0


class _Conn:
    """One accepted WebSocket. Mutated only on the event loop."""

    __slots__ = (
        "car", "serial", "ws", "transport", "queue", "writer", "seq_out", "seq_in", "last_rx",
        "violations", "close_reason", "closer",
    )

    def __init__(self, identity: CarIdentity, ws: web.WebSocketResponse, transport: Any, queue_size: int) -> None:
        self.car = identity.car
        self.serial = identity.serial
        self.ws = ws
        self.transport = transport
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(queue_size)  # None = a WebSocket ping
        self.writer: asyncio.Task[None] | None = None
        self.seq_out = 0
        self.seq_in = -1
        self.last_rx = 0.0
        self.violations: deque[float] = deque()
        self.close_reason: str | None = None
        self.closer: asyncio.Task[None] | None = None


Placement = Callable[[str], "tuple[int, str | None] | None"]
"""Which replica serves a car: None for this one, else (replica, its car-link URL or None if unknown)."""
ReportAuthorizer = Callable[[str, str], bool]
"""May this car report on this assignment uid? (Only on its own pods.)"""


class LinkServer:
    """The car link endpoint. Use ``start``/``stop`` to serve alone, or mount ``routes()`` on another app.

    ``placement`` sends a car another replica serves there (default: every car is served here);
    ``authorize_report`` refuses a car's reports about an assignment that is another car's (default: any).
    """

    def __init__(
        self,
        handler: LinkHandler,
        ssl_context: ssl.SSLContext,
        *,
        config: LinkConfig | None = None,
        revocations: Revocations | None = None,
        registry: Any | None = None,
        placement: Placement | None = None,
        authorize_report: ReportAuthorizer | None = None,
    ) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.config = config or LinkConfig()
        self.revocations = revocations or Revocations()
        self.metrics = LinkMetrics()
        self._placement = placement
        self._authorize_report = authorize_report
        self._conns: dict[str, _Conn] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        if registry is not None:
            registry.register(_Collector(self))

    # ---- lifecycle ------------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [web.get(self.config.path, self._handle)]

    async def start(self, host: str = "0.0.0.0", port: int = 0, app: web.Application | None = None) -> int:
        """Serve on ``host:port`` (0 = any free port); returns the bound port. ``app`` lets other car-facing
        routes (the artifact store) share the listener and its small TLS buffers."""
        app = app if app is not None else web.Application()
        app.add_routes(self.routes())
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        cfg = self.config
        if cfg.tls_read_buffer_bytes <= 0:
            site = web.TCPSite(self._runner, host, port, ssl_context=self.ssl_context, backlog=4096)
            await site.start()
            bound = int(self._runner.addresses[0][1])
        else:
            # What TCPSite does, with a TLS protocol whose read buffer is sized for the car link.
            loop = asyncio.get_running_loop()
            http, ctx, tls = self._runner.server, self.ssl_context, _tls_protocol(cfg.tls_read_buffer_bytes)
            assert http is not None

            def accept() -> asyncio.BaseProtocol:
                proto: asyncio.BaseProtocol = tls(loop, http(), ctx, None, server_side=True,
                                                  ssl_handshake_timeout=cfg.hello_timeout_seconds)
                return proto

            self._listener = await loop.create_server(accept, host, port, backlog=4096)
            bound = int(self._listener.sockets[0].getsockname()[1])
        log.info("car link listening on %s:%d", host, bound)
        return bound

    async def stop(self) -> None:
        """Close every car's connection (they will reconnect elsewhere or later) and stop serving."""
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._conns.values()):
            self._close(conn, CLOSE_SHUTDOWN, "shutdown")
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.config.close_timeout_seconds + 1)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._listener is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.close_timeout_seconds):
                    await self._listener.wait_closed()
            self._listener = None

    # ---- what the shim calls --------------------------------------------------------------------------

    def connected(self) -> set[str]:
        return set(self._conns)

    def is_connected(self, car: str) -> bool:
        return car in self._conns

    def send(self, car: str, msg: ShimMessage) -> bool:
        """Queue ``msg`` for ``car``; False if the car is not connected or its queue is full (never blocks)."""
        conn = self._conns.get(car)
        if conn is None or conn.close_reason is not None:
            self.metrics.send_dropped["notConnected"] += 1
            return False
        if not self._enqueue(conn, msg):
            self.metrics.send_dropped["queueFull"] += 1
            log.warning("car %s: send queue full, %s not sent (it will be retried)", car, msg.type)
            return False
        return True

    def set_revoked(self, cars: set[str], serials: set[int]) -> None:
        """Adopt the full revocation list (from the API); closes the live links it newly revokes."""
        self.revocations.cars, self.revocations.serials = set(cars), set(serials)
        for conn in list(self._conns.values()):
            if self.revocations.is_revoked(CarIdentity(conn.car, conn.serial)):
                log.warning("car %s: certificate revoked (serial %x), closing its link", conn.car, conn.serial)
                self._close(conn, CLOSE_REVOKED, "revoked")

    def revoke(self, *, car: str | None = None, serial: int | None = None) -> bool:
        """Revoke a car (all its certificates) or one certificate; closes a matching live connection at once.

        Returns whether a live connection was closed.
        """
        if car is not None:
            self.revocations.cars.add(car)
        if serial is not None:
            self.revocations.serials.add(serial)
        closed = False
        for conn in list(self._conns.values()):
            if conn.car == car or (serial is not None and conn.serial == serial):
                log.warning("car %s: certificate revoked (serial %x), closing its link", conn.car, conn.serial)
                self._close(conn, CLOSE_REVOKED, "revoked")
                closed = True
        return closed

    # ---- one connection -------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        try:
            identity = identity_from_peercert(peercert)
        except CredentialError as exc:
            self.metrics.connections_refused[exc.reason] += 1
            log.warning("car link from %s refused: %s", request.remote, exc)
            return web.Response(status=403, text=f"{exc}\n")
        if self.revocations.is_revoked(identity):
            self.metrics.connections_refused["revoked"] += 1
            log.warning("car %s: refused, certificate serial %x is revoked", identity.car, identity.serial)
            return web.Response(status=403, text="certificate revoked\n")
        cfg = self.config
        ws = web.WebSocketResponse(
            autoping=False,  # pings and pongs are ours: they drive liveness (see _read_loop)
            compress=False,  # per-connection zlib state costs far more memory than it saves on tiny frames
            max_msg_size=cfg.max_frame_bytes,
            timeout=cfg.close_timeout_seconds,
            decode_text=False,
        )
        async with asyncio.timeout(cfg.hello_timeout_seconds):
            await ws.prepare(request)
        conn = _Conn(identity, ws, transport, cfg.send_queue)
        conn.last_rx = asyncio.get_running_loop().time()
        registered = False
        try:
            hello = await self._read_hello(conn)
            if hello is not None and self._redirected(conn):
                hello = None
            if hello is not None:
                registered = await self._register(conn, hello)
                if registered:
                    await self._read_loop(conn)
        except Exception:
            log.exception("car %s: link failed", conn.car)
            conn.close_reason = conn.close_reason or "error"
        finally:
            if conn.closer is not None:  # let our close (with its code) finish before aiohttp closes with 1000
                await asyncio.wait([conn.closer])
            if conn.writer is not None:
                conn.writer.cancel()
            if registered:
                await self._unregister(conn)
            if conn.closer is None and not ws.closed:
                await self._close_now(conn, int(WSCloseCode.OK), conn.close_reason or "closed")
        return ws

    async def _read_hello(self, conn: _Conn) -> Hello | None:
        cfg = self.config
        try:
            async with asyncio.timeout(cfg.hello_timeout_seconds):
                while True:
                    msg = await conn.ws.receive()
                    if msg.type is WSMsgType.PING:
                        await conn.ws.pong(msg.data)
                        continue
                    if msg.type is WSMsgType.PONG:
                        continue
                    break
        except TimeoutError:
            log.warning("car %s: no hello within %.0f s, closing", conn.car, cfg.hello_timeout_seconds)
            self.metrics.connections_refused["helloTimeout"] += 1
            self._close(conn, CLOSE_BAD_HELLO, "helloTimeout")
            return None
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            self.metrics.connections_refused["closedBeforeHello"] += 1
            return None
        self.metrics.bytes_in += len(msg.data)
        try:
            hello = protocol.decode(msg.data, cfg.max_message_bytes, sender="car")
        except ProtocolError as exc:
            self._refuse(conn, exc.reason, exc.detail)
            hello = None
        if hello is not None and not isinstance(hello, Hello):
            self._refuse(conn, Refusal.NOT_HELLO, f"first message must be hello, got {hello.type}")
            hello = None
        elif hello is not None and hello.car != conn.car:
            self._refuse(conn, Refusal.WRONG_CAR, f"hello names {hello.car!r}, certificate names {conn.car!r}")
            hello = None
        if hello is None:
            self.metrics.connections_refused["badHello"] += 1
            self._close(conn, CLOSE_BAD_HELLO, "badHello")  # flushes the error reply first: it says what to fix
            return None
        conn.seq_in = hello.seq
        self.metrics.messages_in["hello"] += 1
        result: Hello = hello
        return result

    def _redirected(self, conn: _Conn) -> bool:
        """Send a car that another replica serves to it (or away, if its URL is unknown); True if so."""
        owner = self._placement(conn.car) if self._placement is not None else None
        if owner is None:
            return False
        replica, url = owner
        if url is None:
            self._refuse(conn, Refusal.WRONG_REPLICA, f"replica {replica} serves this car; dial it")
            self._close(conn, CLOSE_REDIRECT, "wrongReplica")
        else:
            self._enqueue(conn, Redirect(url=url, replica=replica))
            log.info("car %s: served by replica %d, redirected to %s", conn.car, replica, url)
            self._close(conn, CLOSE_REDIRECT, "redirected")
        self.metrics.connections_refused["redirected"] += 1
        return True

    async def _register(self, conn: _Conn, hello: Hello) -> bool:
        car = conn.car
        async with self._lock(car):
            old = self._conns.pop(car, None)
            if old is not None:
                log.info("car %s: new connection replaces the previous one", car)
                self.metrics.disconnects["replaced"] += 1
                self._close(old, CLOSE_REPLACED, "replaced")
                await self._notify(self.handler.car_disconnected(car, "replaced"), car)
            if self.revocations.is_revoked(CarIdentity(car, conn.serial)):  # revoked while saying hello
                self.metrics.connections_refused["revoked"] += 1
                return False
            self._conns[car] = conn
            self.metrics.connections += 1
            conn.writer = asyncio.create_task(self._write_loop(conn), name=f"carlink-writer-{car}")
            cfg = self.config
            self._enqueue(
                conn,
                Welcome(
                    car=car,
                    heartbeat_seconds=cfg.heartbeat_seconds,
                    telemetry_refresh_seconds=cfg.telemetry_refresh_seconds,
                    max_message_bytes=cfg.max_message_bytes,
                ),
            )
            log.info("car %s: connected (agent %s, %d held assignments)", car, hello.agent_version,
                     len(hello.assignments))
            await self._notify(self.handler.car_connected(car, hello), car)
            return True

    async def _unregister(self, conn: _Conn) -> None:
        car = conn.car
        async with self._lock(car):
            if self._conns.get(car) is not conn:
                return  # replaced: already reported
            del self._conns[car]
            reason = conn.close_reason or "closed"
            self.metrics.disconnects[reason] += 1
            log.info("car %s: disconnected (%s)", car, reason)
            await self._notify(self.handler.car_disconnected(car, reason), car)

    async def _read_loop(self, conn: _Conn) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        ws, car = conn.ws, conn.car
        pinged = False
        while conn.close_reason is None:
            quiet = loop.time() - conn.last_rx
            wait = (cfg.dead_after_seconds if pinged else cfg.heartbeat_seconds) - quiet
            if wait <= 0:
                if pinged:
                    log.warning("car %s: silent for %.0f s, dropping the link", car, quiet)
                    conn.close_reason = "deadPeer"
                    conn.transport.abort()  # a dead peer would never answer a close handshake
                    return
                pinged = True
                if conn.queue.full():
                    continue
                conn.queue.put_nowait(None)
                self.metrics.pings_out += 1
                continue
            try:
                # The only unbounded-looking await: it is bounded by the heartbeat/dead-peer deadline above.
                msg = await ws.receive(timeout=wait)
            except TimeoutError:
                continue
            conn.last_rx = loop.time()
            pinged = False
            kind = msg.type
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                self.metrics.bytes_in += len(msg.data)
                await self._on_frame(conn, msg.data)
            elif kind is WSMsgType.PING:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(cfg.send_timeout_seconds):
                        await ws.pong(msg.data)
            elif kind is WSMsgType.PONG:
                pass
            elif kind is WSMsgType.ERROR:
                exc = msg.data
                if getattr(exc, "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
                    self.metrics.refused[Refusal.OVERSIZED] += 1
                    conn.close_reason = "frameTooBig"
                    log.warning("car %s: frame over %d bytes, link closed", car, cfg.max_frame_bytes)
                else:
                    conn.close_reason = "error"
                    log.info("car %s: link error: %s", car, exc)
                return
            else:  # CLOSE, CLOSING, CLOSED
                conn.close_reason = conn.close_reason or "closedByCar"
                return

    async def _on_frame(self, conn: _Conn, data: bytes | str) -> None:
        car = conn.car
        try:
            msg = protocol.decode(data, self.config.max_message_bytes, sender="car")
        except ProtocolError as exc:
            self._refuse(conn, exc.reason, exc.detail)
            return
        if msg.car != car:
            self._refuse(conn, Refusal.WRONG_CAR, f"message names car {msg.car!r}", msg.seq)
            return
        if msg.seq <= conn.seq_in:
            self._refuse(conn, Refusal.OUT_OF_ORDER, f"seq {msg.seq} is not above {conn.seq_in}", msg.seq)
            return
        if isinstance(msg, Hello):
            self._refuse(conn, Refusal.OUT_OF_ORDER, "hello was already received on this link", msg.seq)
            return
        if (isinstance(msg, PodStatus | Log) and self._authorize_report is not None
                and not self._authorize_report(car, msg.uid)):
            self._refuse(conn, Refusal.FOREIGN_ASSIGNMENT, f"assignment {msg.uid} is not this car's", msg.seq)
            return
        conn.seq_in = msg.seq
        self.metrics.messages_in[msg.type] += 1
        if self._conns.get(car) is conn:  # a replaced connection's late messages are dropped
            await self._notify(self.handler.car_message(car, msg), car)

    def _refuse(self, conn: _Conn, reason: Refusal, detail: str, ref_seq: int | None = None) -> None:
        self.metrics.refused[reason] += 1
        log.warning("car %s: message refused (%s): %s", conn.car, reason, detail)
        self._enqueue(conn, Error(code=reason, message=detail[:1024], ref_seq=ref_seq))
        cfg = self.config
        now = asyncio.get_running_loop().time()
        conn.violations.append(now)
        while conn.violations and conn.violations[0] < now - cfg.violation_window_seconds:
            conn.violations.popleft()
        if len(conn.violations) >= cfg.violation_limit and conn.close_reason is None:
            log.warning("car %s: %d refused messages in %.0f s, disconnecting", conn.car, len(conn.violations),
                        cfg.violation_window_seconds)
            self._close(conn, CLOSE_VIOLATIONS, "violations")

    # ---- writing --------------------------------------------------------------------------------------

    def _enqueue(self, conn: _Conn, msg: BaseModel) -> bool:
        if conn.queue.full():
            return False
        conn.seq_out += 1
        data = protocol.encode(msg.model_copy(update={"seq": conn.seq_out}))
        conn.queue.put_nowait(data)
        self.metrics.messages_out[msg.type] += 1  # type: ignore[attr-defined]
        return True

    async def _write_loop(self, conn: _Conn) -> None:
        ws, timeout = conn.ws, self.config.send_timeout_seconds
        try:
            while True:
                item = await conn.queue.get()
                async with asyncio.timeout(timeout):
                    if item is None:
                        await ws.ping()
                    else:
                        await ws.send_str(item)
                        self.metrics.bytes_out += len(item)
        except TimeoutError:
            log.warning("car %s: not reading (send blocked %.0f s), dropping the link", conn.car, timeout)
            conn.close_reason = conn.close_reason or "slowCar"
            conn.transport.abort()
        except (ConnectionError, RuntimeError) as exc:  # the socket went away under us
            log.debug("car %s: write failed: %s", conn.car, exc)

    def _close(self, conn: _Conn, code: int, reason: str) -> None:
        """Close a connection without waiting on it (the car may be slow or gone)."""
        if conn.closer is not None:
            return
        if conn.close_reason is None:
            conn.close_reason = reason
        task = conn.closer = asyncio.create_task(self._close_now(conn, code, reason), name=f"carlink-close-{conn.car}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close_now(self, conn: _Conn, code: int, reason: str) -> None:
        writer = conn.writer
        if writer is not None and not writer.done():
            writer.cancel()
            await asyncio.wait([writer])
        try:
            async with asyncio.timeout(self.config.close_timeout_seconds):
                for item in _drain(conn.queue):  # e.g. the error reply that explains the close
                    if item is not None:
                        await conn.ws.send_str(item)
                await conn.ws.close(code=code, message=reason.encode())
        except Exception as exc:  # timeout or a broken socket: just cut it
            log.debug("car %s: close handshake failed (%s), aborting", conn.car, exc)
            conn.transport.abort()

    # ---- helpers --------------------------------------------------------------------------------------

    def _lock(self, car: str) -> asyncio.Lock:
        lock = self._locks.get(car)
        if lock is None:
            lock = self._locks[car] = asyncio.Lock()
        return lock

    async def _notify(self, call: Awaitable[None], car: str) -> None:
        try:
            async with asyncio.timeout(self.config.handler_timeout_seconds):
                await call
        except Exception:
            log.exception("car %s: link handler failed", car)


def _tls_protocol(read_buffer: int) -> Any:
    """asyncio's TLS protocol with a smaller read buffer (a subclass: nothing shared is changed)."""
    from asyncio import sslproto

    return type("_CarLinkTLSProtocol", (sslproto.SSLProtocol,), {"max_size": read_buffer})


def _drain(queue: asyncio.Queue[str | None]) -> Iterator[str | None]:
    while not queue.empty():
        yield queue.get_nowait()


class _Collector:
    """Prometheus view of ``LinkMetrics`` (read at scrape time, nothing on the hot path)."""

    def __init__(self, server: LinkServer) -> None:
        self._server = server

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self._server.metrics
        prefix = "fleetlet_shim_link_"
        yield GaugeMetricFamily(prefix + "connected_cars", "Cars with a live link.", value=len(self._server._conns))
        yield CounterMetricFamily(prefix + "connections", "Links accepted (hello done).", value=m.connections)
        yield CounterMetricFamily(prefix + "received_bytes", "WebSocket payload bytes from cars.", value=m.bytes_in)
        yield CounterMetricFamily(prefix + "sent_bytes", "WebSocket payload bytes to cars.", value=m.bytes_out)
        labelled = (
            ("messages_received", "Messages accepted from cars.", "type", m.messages_in),
            ("messages_sent", "Messages queued to cars.", "type", m.messages_out),
            ("messages_refused", "Messages refused.", "reason", m.refused),
            ("connections_refused", "Connections refused.", "reason", m.connections_refused),
            ("disconnects", "Links closed.", "reason", m.disconnects),
            ("sends_dropped", "Messages the shim could not queue.", "reason", m.send_dropped),
        )
        for name, doc, label, counts in labelled:
            family = CounterMetricFamily(prefix + name, doc, labels=[label])
            for key, value in counts.items():
                family.add_metric([str(key)], value)
            yield family
