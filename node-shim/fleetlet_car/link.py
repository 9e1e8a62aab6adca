"""The car's end of the car link: dial the shim, say hello, keep the link alive, carry messages both ways.

Cars sit behind cellular NAT, so the car dials the shim (TLS WebSocket, its own client certificate, the fleet
CA to check the shim) and keeps dialling: exponential backoff with full jitter, capped. Each connection starts
with ``hello`` (the agent's version, runtimes, execution providers, capacity, and the assignments the car
still holds, so work resumes after a reconnect or a shim restart). Telemetry is sent when it changes beyond a
deadband (at once for drive state, plug and charging changes) and refreshed slowly otherwise. Liveness: the car
answers the shim's WebSocket pings, pings the shim itself only after a long silence, and redials when the shim
has been silent too long. A ``redirect`` (another shim replica serves this car) closes the link and dials the
given URL next; after 3 failed dials in a row to a redirected URL the car goes back to its bootstrap URL.

It is a transport, not a store: ``send`` returns False when it cannot send now (no link, or the link's queue is
full), and whatever must reach the shim is kept and re-sent by the agent (its outbox, re-sent after every
welcome: ``on_welcome``) until the shim acks it.

The agent uses ``start``/``close``, ``send``, ``report_telemetry``, ``connected``, ``on_welcome`` and
``messages()`` (or an ``on_message`` callback) for ``assign``/``stop``/``ack``/``policy``/``error``. This module
must never block the agent (every method the agent calls returns at once or is bounded by a timeout), never
import the shim, and never stop work itself: the safety reflex does not depend on the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from os import PathLike
from typing import Any

import aiohttp

from fleetlet.api.v1alpha1 import Telemetry
from fleetlet.carlink import protocol
from fleetlet.carlink.protocol import (
    Ack,
    Assign,
    Capacity,
    Error,
    HeldAssignment,
    Hello,
    OwnerPolicy,
    Ping,
    PodStatus,
    Pong,
    ProtocolError,
    Redirect,
    Stop,
    TelemetryReport,
    Welcome,
)

log = logging.getLogger(__name__)

Command = Assign | Stop | Ack | OwnerPolicy | Error
"""What the link hands to the agent."""

REDIRECT_ATTEMPTS = 3
"""Failed dials in a row to a redirected URL before the car goes back to its bootstrap URL."""
_MAX_PROVIDERS = 16  # protocol.Hello.providers max_length: a longer list would make the hello itself invalid


@dataclass(frozen=True)
class CarLinkConfig:
    # The shim pings a quiet car every 30 s; the car pings only if it has heard nothing for longer.
    heartbeat_seconds: float = 40.0
    dead_after_seconds: float = 60.0
    connect_timeout_seconds: float = 15.0
    welcome_timeout_seconds: float = 10.0
    send_timeout_seconds: float = 10.0
    close_timeout_seconds: float = 5.0
    backoff_base_seconds: float = 0.5
    backoff_cap_seconds: float = 60.0
    stable_after_seconds: float = 30.0  # a link that lived this long resets the backoff
    send_queue: int = 256
    inbox: int = 1024
    max_message_bytes: int = protocol.MAX_MESSAGE_BYTES
    telemetry_refresh_seconds: float = 300.0
    soc_deadband: float = 0.01
    temperature_deadband_c: float = 1.0
    link_quality_deadband: float = 0.2
    energy_deadband_kwh: float = 0.05

    def __post_init__(self) -> None:
        if self.dead_after_seconds <= self.heartbeat_seconds:
            raise ValueError("dead_after_seconds must exceed heartbeat_seconds")


@dataclass
class CarLinkStats:
    connects: int = 0  # welcomed connections
    failures: int = 0  # dials or connections that ended in an error
    messages_out: int = 0
    messages_in: int = 0
    bytes_out: int = 0  # WebSocket payload bytes (TLS and framing not included)
    bytes_in: int = 0
    send_refused: int = 0  # messages ``send`` could not queue (no link, or its queue full)
    errors_received: int = 0
    redirects: int = 0
    last_close_code: int | None = None


def car_ssl_context(
    ca_file: str | PathLike[str], cert_file: str | PathLike[str], key_file: str | PathLike[str]
) -> ssl.SSLContext:
    """TLS 1.3 client context: present the car's certificate, trust only the fleet CA for the shim."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class CarLink:
    """One car's link to its shim. Create, ``start()``, use, ``await close()``; all on one event loop."""

    def __init__(
        self,
        url: str,
        car: str,
        ssl_context: ssl.SSLContext,
        *,
        agent_version: str,
        runtimes: Iterable[str],
        capacity: Capacity,
        providers: Iterable[str] = (),
        held: Callable[[], Iterable[HeldAssignment]] = tuple,
        on_message: Callable[[Command], Awaitable[None]] | None = None,
        on_welcome: Callable[[], None] | None = None,
        config: CarLinkConfig | None = None,
        session: aiohttp.ClientSession | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``held`` is asked for the hello's assignments before each hello; ``on_welcome`` is called (on the
        loop, quick, no await) once each connection is welcomed and can carry messages."""
        self.url = url  # the bootstrap URL: where the car starts, and goes back to when a redirect fails
        self.car = car
        self.ssl_context = ssl_context
        self.agent_version = agent_version
        self.runtimes = list(runtimes)
        self.providers = list(providers)
        self.capacity = capacity
        self.held = held
        self.on_message = on_message
        self.on_welcome = on_welcome
        self.config = config or CarLinkConfig()
        self.stats = CarLinkStats()
        self.connected = asyncio.Event()
        self.welcome: Welcome | None = None
        self._session = session
        self._rng = rng or random.Random()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._queue: asyncio.Queue[Any] | None = None  # messages, or None for a WebSocket ping
        self._seq = 0
        self._redirect: str | None = None  # where a redirect sent the car; None: the bootstrap URL
        self._redirect_failures = 0  # failed dials in a row to the redirected URL
        self._redirected = False  # the connection that just ended was closed to follow a redirect
        self._inbox: asyncio.Queue[Command] = asyncio.Queue(self.config.inbox)
        self._telemetry: Telemetry | None = None  # the latest the agent reported
        self._telemetry_sent: Telemetry | None = None
        self._telemetry_sent_at = 0.0

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"carlink-{self.car}")
        return self._task

    async def close(self) -> None:
        self._closing.set()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.config.close_timeout_seconds):
                    await ws.close()
        if self._task is not None:
            try:
                async with asyncio.timeout(self.config.close_timeout_seconds):
                    await self._task
            except TimeoutError:
                self._task.cancel()

    @property
    def target(self) -> str:
        """The URL the car dials now: a redirect's, else the bootstrap URL."""
        return self._redirect or self.url

    async def run(self) -> None:
        """Dial, serve, redial until ``close()``."""
        own_session = self._session is None
        session = self._session or aiohttp.ClientSession()
        cfg = self.config
        loop = asyncio.get_running_loop()
        attempt = 0
        hops = 0  # redirects in a row: replicas that keep bouncing the car get backoff, not a tight loop
        try:
            while not self._closing.is_set():
                started = loop.time()
                welcomed = False
                url = self.target
                self._redirected = False
                try:
                    welcomed = await self._connect_and_serve(session, url)
                except (aiohttp.ClientError, OSError, TimeoutError, ProtocolError) as exc:
                    self.stats.failures += 1
                    log.warning("car %s: link to %s failed: %s", self.car, url, _describe(exc))
                except Exception:  # a bug must not leave the car unreachable for good: log and redial
                    self.stats.failures += 1
                    log.exception("car %s: link to %s failed unexpectedly", self.car, url)
                if self._closing.is_set():
                    break
                if self._redirected:
                    hops += 1  # straight to the replica that serves the car, unless it bounces the car back
                    delay = 0.0 if hops == 1 else self._backoff(min(hops - 1, 32))
                else:
                    hops = 0
                    self._count_redirect_dial(url, welcomed)
                    if welcomed and loop.time() - started >= cfg.stable_after_seconds:
                        attempt = 0
                    delay = self._backoff(attempt)
                    attempt = min(attempt + 1, 32)
                log.info("car %s: redialling %s in %.2f s", self.car, self.target, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._closing.wait()
        finally:
            if own_session:
                await session.close()

    def _backoff(self, attempt: int) -> float:
        cfg = self.config
        return self._rng.uniform(0.0, min(cfg.backoff_cap_seconds, cfg.backoff_base_seconds * 2**attempt))

    def _count_redirect_dial(self, url: str, welcomed: bool) -> None:
        if self._redirect is None or url != self._redirect:
            return
        if welcomed:
            self._redirect_failures = 0
            return
        self._redirect_failures += 1
        if self._redirect_failures >= REDIRECT_ATTEMPTS:
            log.warning("car %s: %d dials in a row to the redirected %s failed; back to the bootstrap %s",
                        self.car, self._redirect_failures, url, self.url)  # fmt: skip
            self._redirect, self._redirect_failures = None, 0

    def _follow(self, msg: Redirect) -> bool:
        """Adopt a redirect (True), or refuse one that would drop TLS (False)."""
        if msg.url.startswith("ws://") and not self.url.startswith("ws://"):
            log.warning("car %s: refused a redirect to %s: the link must stay on TLS (wss://)", self.car, msg.url)
            return False
        self.stats.redirects += 1
        self._redirect, self._redirect_failures, self._redirected = msg.url, 0, True
        log.info("car %s: redirected to shim replica %d at %s", self.car, msg.replica, msg.url)
        return True

    # ---- what the agent calls -------------------------------------------------------------------------

    async def send(self, msg: PodStatus | TelemetryReport | protocol.Log | Pong) -> bool:
        """Queue a message on the live link (its ``seq`` is stamped when written). False when it cannot be
        sent now (no welcomed link, or its queue is full): nothing is kept here, the caller keeps what matters.
        Telemetry sent this way skips the deadband."""
        if msg.car != self.car:
            raise ValueError(f"message names car {msg.car!r}, this link is {self.car!r}")
        if isinstance(msg, TelemetryReport):
            self._telemetry = msg.telemetry
            return self._send_telemetry()
        if self._put(msg):
            return True
        self.stats.send_refused += 1
        return False

    def report_telemetry(self, telemetry: Telemetry) -> bool:
        """Note the car's latest telemetry; it is sent now only if it moved past a deadband (returns whether)."""
        self._telemetry = telemetry
        last = self._telemetry_sent
        if last is not None and not self._significant(last, telemetry):
            return False
        return self._send_telemetry()

    async def messages(self) -> AsyncIterator[Command]:
        """Assignments, stops, acks, owner policies and errors from the shim, in order (when no ``on_message``
        callback is set)."""
        while True:
            yield await self._inbox.get()

    # ---- one connection -------------------------------------------------------------------------------

    async def _connect_and_serve(self, session: aiohttp.ClientSession, url: str) -> bool:
        cfg = self.config
        async with asyncio.timeout(cfg.connect_timeout_seconds):
            ws = await session.ws_connect(
                url,
                ssl=self.ssl_context,
                autoping=False,  # we answer pings ourselves: every frame counts as a sign of life
                compress=0,
                max_msg_size=4 * cfg.max_message_bytes,
            )
        self._ws = ws
        queue: asyncio.Queue[Any] = asyncio.Queue(cfg.send_queue)
        writer: asyncio.Task[None] | None = None
        try:
            self._seq = 0
            await self._write(ws, Hello(
                car=self.car,
                agent_version=self.agent_version,
                runtimes=self.runtimes,
                providers=self.providers[:_MAX_PROVIDERS],
                capacity=self.capacity,
                assignments=list(self.held()),
            ))
            welcome = await self._await_welcome(ws)
            if welcome is None:
                return False
            self.welcome = welcome
            self.stats.connects += 1
            log.info("car %s: link up to %s (shim heartbeat %.0f s)", self.car, url, welcome.heartbeat_seconds)
            self._queue = queue
            writer = asyncio.create_task(self._write_loop(ws, queue), name=f"carlink-writer-{self.car}")
            self.connected.set()
            if self.on_welcome is not None:  # the agent re-sends its outbox first: what the shim must hear
                try:
                    self.on_welcome()
                except Exception:
                    log.exception("car %s: on_welcome failed", self.car)
            if self._telemetry is not None:
                self._send_telemetry()
            await self._read_loop(ws)
            return True
        finally:
            self.connected.clear()
            self._queue = None
            self._ws = None
            if writer is not None:
                writer.cancel()
            if not ws.closed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(cfg.close_timeout_seconds):
                        await ws.close()
            self.stats.last_close_code = ws.close_code
            log.info("car %s: link down (close code %s)", self.car, ws.close_code)

    async def _await_welcome(self, ws: aiohttp.ClientWebSocketResponse) -> Welcome | None:
        async with asyncio.timeout(self.config.welcome_timeout_seconds):
            while True:
                frame = await ws.receive()
                if frame.type is aiohttp.WSMsgType.PING:
                    await ws.pong(frame.data)
                    continue
                if frame.type is aiohttp.WSMsgType.PONG:
                    continue
                if frame.type is not aiohttp.WSMsgType.TEXT:
                    log.warning("car %s: link closed before welcome (close code %s)", self.car, ws.close_code)
                    return None
                self.stats.bytes_in += len(frame.data)
                msg = protocol.decode(frame.data, self.config.max_message_bytes, sender="shim")
                if isinstance(msg, Redirect):
                    if self._follow(msg):
                        return None
                    continue
                if isinstance(msg, Welcome):
                    if msg.car != self.car:
                        log.error("car %s: the shim knows this certificate as %r", self.car, msg.car)
                    return msg
                if isinstance(msg, Error):
                    self.stats.errors_received += 1
                    log.error("car %s: hello refused (%s): %s", self.car, msg.code, msg.message)
                    return None
                log.warning("car %s: expected welcome, got %s", self.car, msg.type)

    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        last_rx = loop.time()
        pinged = False
        while not self._closing.is_set():
            now = loop.time()
            if self._telemetry is not None and now - self._telemetry_sent_at >= cfg.telemetry_refresh_seconds:
                if not self._send_telemetry():
                    self._telemetry_sent_at = now  # queue full: try again a refresh later, do not spin
            quiet = now - last_rx
            wait = (cfg.dead_after_seconds if pinged else cfg.heartbeat_seconds) - quiet
            if wait <= 0:
                if pinged:
                    log.warning("car %s: shim silent for %.0f s, redialling", self.car, quiet)
                    return
                pinged = True
                if self._queue is not None and not self._queue.full():
                    self._queue.put_nowait(None)
                continue
            refresh_in = self._telemetry_sent_at + cfg.telemetry_refresh_seconds - now
            if self._telemetry is not None:
                wait = min(wait, max(refresh_in, 0.001))
            try:
                # Bounded by the heartbeat, dead-shim and telemetry-refresh deadlines computed above.
                frame = await ws.receive(timeout=wait)
            except TimeoutError:
                continue
            last_rx = loop.time()
            pinged = False
            kind = frame.type
            if kind is aiohttp.WSMsgType.TEXT:
                self.stats.bytes_in += len(frame.data)
                await self._on_text(frame.data)
            elif kind is aiohttp.WSMsgType.PING:
                async with asyncio.timeout(cfg.send_timeout_seconds):
                    await ws.pong(frame.data)
            elif kind is aiohttp.WSMsgType.PONG:
                pass
            else:  # CLOSE, CLOSING, CLOSED, ERROR, BINARY (the shim never sends binary)
                return
            if self._redirected:
                return

    async def _on_text(self, data: str) -> None:
        try:
            msg = protocol.decode(data, self.config.max_message_bytes, sender="shim")
        except ProtocolError as exc:
            log.warning("car %s: unreadable message from the shim: %s", self.car, exc)
            return
        self.stats.messages_in += 1
        if isinstance(msg, Ping):
            self._put(Pong(car=self.car, echo=msg.seq))
            return
        if isinstance(msg, Welcome):
            return
        if isinstance(msg, Redirect):
            self._follow(msg)  # the read loop ends the connection; the run loop dials the new URL
            return
        if isinstance(msg, Error):
            self.stats.errors_received += 1
            log.warning("car %s: shim refused message %s (%s): %s", self.car, msg.ref_seq, msg.code, msg.message)
        if self.on_message is not None:
            try:
                await self.on_message(msg)
            except Exception:
                log.exception("car %s: on_message failed for %s", self.car, msg.type)
        else:
            await self._inbox.put(msg)  # back-pressure: an agent that stops reading stops this link reading

    # ---- writing --------------------------------------------------------------------------------------

    def _put(self, msg: Any) -> bool:
        queue = self._queue
        if queue is None or queue.full():
            return False
        queue.put_nowait(msg)
        return True

    def _send_telemetry(self) -> bool:
        assert self._telemetry is not None
        if not self._put(TelemetryReport(car=self.car, telemetry=self._telemetry)):
            return False  # kept as the latest; sent after the next hello
        self._telemetry_sent = self._telemetry
        self._telemetry_sent_at = asyncio.get_running_loop().time()
        return True

    def _significant(self, a: Telemetry, b: Telemetry) -> bool:
        cfg = self.config
        return (
            a.drive_state != b.drive_state
            or a.plugged_in != b.plugged_in
            or a.charging != b.charging
            or abs(a.state_of_charge - b.state_of_charge) >= cfg.soc_deadband
            or abs(a.battery_temperature_c - b.battery_temperature_c) >= cfg.temperature_deadband_c
            or abs(a.compute_temperature_c - b.compute_temperature_c) >= cfg.temperature_deadband_c
            or abs(a.link_quality - b.link_quality) >= cfg.link_quality_deadband
            or a.energy_day != b.energy_day
            or abs(a.energy_today_kwh - b.energy_today_kwh) >= cfg.energy_deadband_kwh
        )

    async def _write(self, ws: aiohttp.ClientWebSocketResponse, msg: Any) -> None:
        async with asyncio.timeout(self.config.send_timeout_seconds):
            if msg is None:
                await ws.ping()
                return
            self._seq += 1
            data = protocol.encode(msg.model_copy(update={"seq": self._seq}))
            await ws.send_str(data)
        self.stats.messages_out += 1
        self.stats.bytes_out += len(data)

    async def _write_loop(self, ws: aiohttp.ClientWebSocketResponse, queue: asyncio.Queue[Any]) -> None:
        msg: Any = None
        try:
            while True:
                msg = await queue.get()
                await self._write(ws, msg)
        except (TimeoutError, ConnectionError, RuntimeError) as exc:
            log.warning("car %s: write failed (%s), closing the link", self.car, _describe(exc))
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.config.close_timeout_seconds):
                    await ws.close()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
