"""The car link end to end on loopback: a real TLS WebSocket server, real car clients, certificates from the fleet CA.

What a user of the link relies on: a car is known only by its certificate; cars without a fleet certificate never
get in; one car cannot speak for another or about another's work; bad input is refused, counted and survived;
a misbehaving or revoked car is cut off alone; cars come back by themselves after a shim restart and say what
they still hold and which execution providers they offer; the link is a transport that says when it cannot
send (the agent's outbox re-sends after every welcome); a redirect takes a car to the replica that serves it,
and back to its bootstrap shim when that replica cannot be reached.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fleetlet_car.link import REDIRECT_ATTEMPTS, CarLink, CarLinkConfig, car_ssl_context
from fleetlet_shim.link import CAR_ORGANIZATION, LinkConfig, LinkServer, server_ssl_context
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from fleetlet.api.v1alpha1 import Telemetry
from fleetlet.api.v1alpha1.shard import ShardAssignment, ShardInput, ShardModel, ShardResources
from fleetlet.api.v1alpha1.vehiclenode import Policy
from fleetlet.carlink import protocol
from fleetlet.carlink.protocol import (
    Ack,
    Assign,
    Capacity,
    Checkpoint,
    ContainerState,
    Grant,
    HeldAssignment,
    Hello,
    OwnerPolicy,
    PodStatus,
    ProtocolError,
    Redirect,
    Refusal,
    Stop,
    TelemetryReport,
    Welcome,
)
from fleetlet.pki import CertificateAuthority

DIGEST = "ab" * 32
CARS = ("car-a", "car-b")


# ---- fixtures -----------------------------------------------------------------------------------------------


@dataclass
class Pki:
    dir: Path
    serials: dict[str, int]

    def car_ctx(self, stem: str) -> ssl.SSLContext:
        return car_ssl_context(self.dir / "ca.crt", self.dir / f"{stem}.crt", self.dir / f"{stem}.key")

    def bare_ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.dir / "ca.crt")

    def server_ctx(self) -> ssl.SSLContext:
        return server_ssl_context(self.dir / "ca.crt", self.dir / "shim.crt", self.dir / "shim.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create()
    ca.pair.write(d, "ca")
    ca.issue("shim", server=True, dns_names=("localhost",), ip_addresses=("127.0.0.1",)).write(d, "shim")
    serials = {}
    for car in CARS:
        pair = ca.issue(car, organizations=(CAR_ORGANIZATION,), client=True)
        pair.write(d, car)
        serials[car] = pair.cert.serial_number
    ca.issue("car-c", client=True).write(d, "no-org")  # signed by the fleet CA, but not as a car
    other = CertificateAuthority.create("someone-else")
    other.issue("car-a", organizations=(CAR_ORGANIZATION,), client=True).write(d, "rogue")
    return Pki(d, serials)


@dataclass
class Recorder:
    """A LinkHandler that remembers what it was told."""

    events: list[tuple[str, str, Any]] = field(default_factory=list)

    async def car_connected(self, car: str, hello: Hello) -> None:
        self.events.append(("connected", car, hello))

    async def car_message(self, car: str, msg: Any) -> None:
        self.events.append(("message", car, msg))

    async def car_disconnected(self, car: str, reason: str) -> None:
        self.events.append(("disconnected", car, reason))

    def messages(self, car: str, kind: str | None = None) -> list[Any]:
        return [m for e, c, m in self.events if e == "message" and c == car and (kind is None or m.type == kind)]

    def lifecycle(self, car: str) -> list[tuple[str, Any]]:
        return [(e, m if e == "disconnected" else None) for e, c, m in self.events if c == car and e != "message"]


@dataclass
class Shim:
    server: LinkServer
    handler: Recorder
    port: int

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/v1/link"


FAST = {"heartbeat_seconds": 5.0, "dead_after_seconds": 10.0, "violation_limit": 5, "close_timeout_seconds": 1.0}


@pytest.fixture
async def start_shim(pki: Pki) -> AsyncIterator[Callable[..., Awaitable[Shim]]]:
    started: list[LinkServer] = []

    async def start(port: int = 0, registry: Any = None, authorize_report: Any = None, **config: Any) -> Shim:
        handler = Recorder()
        extra = {"authorize_report": authorize_report} if authorize_report is not None else {}
        server = LinkServer(handler, pki.server_ctx(), config=LinkConfig(**(FAST | config)), registry=registry,
                            **extra)  # fmt: skip
        started.append(server)
        return Shim(server, handler, await server.start("127.0.0.1", port))

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def eventually(check: Callable[[], Any], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - polling what a user would observe, not an internal event
            await asyncio.sleep(0.01)


def capacity() -> Capacity:
    return Capacity(cpu="4", memory="8Gi")


def hello(car: str, seq: int = 1, **kw: Any) -> str:
    return protocol.encode(Hello(car=car, seq=seq, agent_version="test", runtimes=["onnx"], capacity=capacity(), **kw))


def status(car: str, uid: str, seq: int, phase: str = "Running", items: int = 0) -> str:
    state = "terminated" if phase in ("Succeeded", "Failed") else "running"
    return protocol.encode(PodStatus(car=car, seq=seq, uid=uid, phase=phase, items_done=items,
                                     container=ContainerState(state=state)))


def assign(uid: str) -> Assign:
    return Assign(
        uid=uid, namespace="jobs", name=f"shard-{uid}",
        assignment=ShardAssignment(model=ShardModel(sha256=DIGEST, runtime="onnx"),
                                   input=ShardInput(sha256=DIGEST, format="npy", start=0, end=100),
                                   resources=ShardResources(cpu="1", memory="1Gi")),
        grant=Grant(token="t0ken", base_url="https://artifacts.example/"),
    )


async def raw_car(session: aiohttp.ClientSession, shim: Shim, ctx: ssl.SSLContext, car: str) -> Any:
    """A hand-driven car: connects, says hello, returns the socket after the welcome."""
    ws = await session.ws_connect(shim.url, ssl=ctx, autoping=True)
    await ws.send_str(hello(car))
    welcome = await receive_json(ws)
    assert welcome["type"] == "welcome" and welcome["car"] == car
    return ws


async def receive_json(ws: Any, within: float = 5.0) -> dict[str, Any]:
    msg = await ws.receive(timeout=within)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, ws.close_code)
    return json.loads(msg.data)


async def wait_closed(ws: Any, within: float = 5.0) -> int | None:
    async with asyncio.timeout(within):
        while (await ws.receive()).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                                aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
            pass
    return ws.close_code


def telemetry(**kw: Any) -> Telemetry:
    base: dict[str, Any] = dict(state_of_charge=0.8, plugged_in=True, drive_state="Parked",
                                battery_temperature_c=20.0, compute_temperature_c=30.0,
                                observed_at=dt.datetime.now(dt.UTC))
    return Telemetry(**(base | kw))


def car_link(pki: Pki, shim: Shim | str, car: str = "car-a", **kw: Any) -> CarLink:
    config = CarLinkConfig(backoff_base_seconds=0.05, backoff_cap_seconds=0.2, stable_after_seconds=0.5)
    url = shim if isinstance(shim, str) else shim.url
    return CarLink(url, car, pki.car_ctx(car), agent_version="test", runtimes=["onnx"],
                   capacity=capacity(), config=config, **kw)


# ---- the schema -------------------------------------------------------------------------------------------


def test_decode_says_precisely_why_a_message_is_refused() -> None:
    def reason(raw: str | bytes, **kw: Any) -> tuple[Refusal, str | None]:
        with pytest.raises(ProtocolError) as err:
            protocol.decode(raw, **kw)
        return err.value.reason, err.value.field

    assert reason("{not json") == (Refusal.MALFORMED, None)
    assert reason("[1, 2]") == (Refusal.MALFORMED, None)
    assert reason('{"type": "selfDestruct", "car": "car-a"}') == (Refusal.UNKNOWN_TYPE, "type")
    assert reason(protocol.encode(assign("u1")), sender="car") == (Refusal.UNKNOWN_TYPE, "type")
    assert reason('{"car": "car-a"}') == (Refusal.SCHEMA, "type")
    bad_phase = status("car-a", "u1", 2).replace("Running", "Exploding")
    assert reason(bad_phase) == (Refusal.SCHEMA, "phase")
    assert reason(status("car-a", "u1", 2)[:-1] + ',"sneaky":1}') == (Refusal.SCHEMA, "sneaky")
    assert reason("x" * 2000, max_bytes=1000) == (Refusal.OVERSIZED, None)
    assert reason("é" * 600, max_bytes=1000) == (Refusal.OVERSIZED, None)  # counted in bytes, not characters
    report = TelemetryReport(car="car-a", seq=3, telemetry=telemetry())
    assert protocol.decode(protocol.encode(report), sender="car") == report


def test_an_idle_telemetry_report_is_small() -> None:
    report = TelemetryReport(car="car-0001", seq=123, telemetry=telemetry())
    assert len(protocol.encode(report)) < 300  # one every 5 minutes when idle ≈ 1 byte/s


# ---- identity ---------------------------------------------------------------------------------------------


async def test_car_is_identified_by_its_certificate_and_says_what_it_holds(start_shim: Any, pki: Pki) -> None:
    registry = CollectorRegistry()
    shim = await start_shim(registry=registry)
    held = [HeldAssignment(uid="pod-1", phase="Running", items_done=40,
                           checkpoint=Checkpoint(sha256=DIGEST, items_done=40))]
    link = car_link(pki, shim, held=lambda: held, providers=["CPUExecutionProvider"])
    link.start()
    try:
        await asyncio.wait_for(link.connected.wait(), 5)
        assert shim.server.connected() == {"car-a"}
        assert link.welcome is not None and link.welcome.car == "car-a"
        [(event, car, got)] = shim.handler.events
        assert (event, car) == ("connected", "car-a")
        assert got.assignments == held and got.runtimes == ["onnx"]
        assert got.providers == ["CPUExecutionProvider"]
        assert registry.get_sample_value("fleetlet_shim_link_connected_cars") == 1
        assert registry.get_sample_value("fleetlet_shim_link_messages_received_total", {"type": "hello"}) == 1
    finally:
        await link.close()
    await eventually(lambda: not shim.server.connected())
    assert shim.handler.lifecycle("car-a") == [("connected", None), ("disconnected", "closedByCar")]


async def test_cars_without_a_fleet_car_certificate_are_refused(
    start_shim: Any, pki: Pki, session: aiohttp.ClientSession
) -> None:
    shim = await start_shim()
    for ctx in (pki.bare_ctx(), pki.car_ctx("rogue")):  # no certificate; a certificate from another CA
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            ws = await session.ws_connect(shim.url, ssl=ctx)
            await ws.send_str(hello("car-a"))  # TLS 1.3 may report the refusal only on first use
            await receive_json(ws)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # fleet CA, but not issued as a car
        await session.ws_connect(shim.url, ssl=pki.car_ctx("no-org"))
    assert refused.value.status == 403
    assert shim.server.metrics.connections_refused["notACar"] == 1
    assert shim.server.connected() == set() and shim.handler.events == []


async def test_a_car_cannot_say_hello_as_another(start_shim: Any, pki: Pki, session: aiohttp.ClientSession) -> None:
    shim = await start_shim()
    ws = await session.ws_connect(shim.url, ssl=pki.car_ctx("car-a"))
    await ws.send_str(hello("car-b"))
    error = await receive_json(ws)
    assert error["type"] == "error" and error["code"] == "wrongCar"
    await wait_closed(ws)
    assert shim.server.connected() == set() and shim.handler.events == []


# ---- refusing bad traffic -----------------------------------------------------------------------------------


async def test_a_forged_message_is_refused_and_the_other_car_is_unaffected(
    start_shim: Any, pki: Pki, session: aiohttp.ClientSession
) -> None:
    pods = {"pod-a": "car-a", "pod-b": "car-b"}  # whose pod is whose, as the shim knows from the API
    shim = await start_shim(authorize_report=lambda car, uid: pods.get(uid) == car)
    a = await raw_car(session, shim, pki.car_ctx("car-a"), "car-a")
    b = await raw_car(session, shim, pki.car_ctx("car-b"), "car-b")
    assert shim.server.send("car-a", assign("pod-a"))
    assert shim.server.send("car-b", assign("pod-b"))
    assert (await receive_json(a))["uid"] == "pod-a"
    assert (await receive_json(b))["uid"] == "pod-b"

    await a.send_str(status("car-b", "pod-b", seq=2, phase="Failed"))  # speaks as car B
    assert (await receive_json(a))["code"] == "wrongCar"
    await a.send_str(status("car-a", "pod-b", seq=3, phase="Failed"))  # about car B's work
    assert (await receive_json(a))["code"] == "foreignAssignment"
    await a.send_str(status("car-a", "pod-a", seq=4, items=10))  # its own: still welcome
    await b.send_str(status("car-b", "pod-b", seq=2, items=7))

    await eventually(lambda: shim.handler.messages("car-a") and shim.handler.messages("car-b"))
    assert [m.uid for m in shim.handler.messages("car-a")] == ["pod-a"]
    assert [(m.uid, m.phase, m.items_done) for m in shim.handler.messages("car-b")] == [("pod-b", "Running", 7)]
    assert shim.server.metrics.refused == {"wrongCar": 1, "foreignAssignment": 1}
    assert shim.server.connected() == {"car-a", "car-b"}


async def test_malformed_unknown_and_oversized_messages_are_refused_counted_and_survived(
    start_shim: Any, pki: Pki, session: aiohttp.ClientSession
) -> None:
    shim = await start_shim(max_message_bytes=4096, max_frame_bytes=16384, violation_limit=50)
    a = await raw_car(session, shim, pki.car_ctx("car-a"), "car-a")
    for frame, code in (
        ("{this is not json", "malformed"),
        ('{"type":"selfDestruct","car":"car-a","seq":2}', "unknownType"),
        ('{"type":"assign","car":"car-a","seq":2}', "unknownType"),  # a shim message from a car
        (status("car-a", "pod-a", 2).replace('"Running"', '"Levitating"'), "schema"),
        ("x" * 8000, "oversized"),
    ):
        await a.send_str(frame)
        error = await receive_json(a)
        assert (error["type"], error["code"]) == ("error", code), error
    report = TelemetryReport(car="car-a", seq=2, telemetry=telemetry())
    await a.send_str(protocol.encode(report))
    await eventually(lambda: shim.handler.messages("car-a", "telemetry"))
    assert shim.handler.messages("car-a", "telemetry")[0].telemetry == report.telemetry
    assert shim.server.metrics.refused == {"malformed": 1, "unknownType": 2, "schema": 1, "oversized": 1}
    b = await raw_car(session, shim, pki.car_ctx("car-b"), "car-b")  # still serving others
    # A frame beyond the hard frame limit is not read at all: that car's link is cut (1009), nobody else's.
    await a.send_str("y" * 20000)
    assert await wait_closed(a) in (1009, 1006)  # 1009 sent; the peer may see the socket drop first
    await eventually(lambda: shim.server.connected() == {"car-b"})
    assert shim.server.metrics.refused["oversized"] == 2
    assert shim.handler.lifecycle("car-a")[-1] == ("disconnected", "frameTooBig")
    assert not b.closed


async def test_repeated_violations_disconnect_only_the_offender(
    start_shim: Any, pki: Pki, session: aiohttp.ClientSession
) -> None:
    shim = await start_shim(violation_limit=5)
    a = await raw_car(session, shim, pki.car_ctx("car-a"), "car-a")
    b = await raw_car(session, shim, pki.car_ctx("car-b"), "car-b")
    for _ in range(5):
        await a.send_str("garbage")
    for _ in range(5):  # each refusal is explained before the link is cut
        assert (await receive_json(a))["code"] == "malformed"
    assert await wait_closed(a) == 4008
    await eventually(lambda: shim.server.connected() == {"car-b"})
    assert ("disconnected", "violations") in shim.handler.lifecycle("car-a")
    await b.send_str(protocol.encode(TelemetryReport(car="car-b", seq=2, telemetry=telemetry())))
    await eventually(lambda: shim.handler.messages("car-b", "telemetry"))
    assert shim.server.metrics.refused["malformed"] == 5


async def test_a_slow_car_fills_only_its_own_queue(start_shim: Any, pki: Pki, session: aiohttp.ClientSession) -> None:
    shim = await start_shim(send_queue=8)
    a = await raw_car(session, shim, pki.car_ctx("car-a"), "car-a")  # and never reads again
    b = await raw_car(session, shim, pki.car_ctx("car-b"), "car-b")
    accepted = [shim.server.send("car-a", Stop(uid=f"pod-{i}")) for i in range(50)]
    assert accepted.count(True) <= 8 and not all(accepted)  # bounded, and send never blocked
    assert shim.server.send("car-b", Stop(uid="pod-b"))
    assert (await receive_json(b))["uid"] == "pod-b"
    assert shim.server.metrics.send_dropped["queueFull"] >= 42
    assert shim.server.connected() == {"car-a", "car-b"} and not a.closed


async def test_a_silent_car_is_dropped_as_a_dead_peer(start_shim: Any, pki: Pki, session: aiohttp.ClientSession) -> None:
    shim = await start_shim(heartbeat_seconds=0.2, dead_after_seconds=0.5)
    ws = await session.ws_connect(shim.url, ssl=pki.car_ctx("car-a"), autoping=False)  # never answers pings
    await ws.send_str(hello("car-a"))
    await eventually(lambda: shim.server.connected() == {"car-a"})
    await eventually(lambda: not shim.server.connected(), within=3)
    assert shim.handler.lifecycle("car-a")[-1] == ("disconnected", "deadPeer")
    assert shim.server.metrics.pings_out >= 1


# ---- revocation and replacement -----------------------------------------------------------------------------


async def test_revocation_closes_the_live_link_and_refuses_reconnects(start_shim: Any, pki: Pki) -> None:
    shim = await start_shim()
    a, b = car_link(pki, shim, "car-a"), car_link(pki, shim, "car-b")
    a.start()
    b.start()
    try:
        await asyncio.wait_for(asyncio.gather(a.connected.wait(), b.connected.wait()), 5)
        assert shim.server.revoke(car="car-a")
        await eventually(lambda: shim.server.connected() == {"car-b"})
        assert ("disconnected", "revoked") in shim.handler.lifecycle("car-a")
        await eventually(lambda: shim.server.metrics.connections_refused["revoked"] >= 2)  # it keeps trying
        assert shim.server.revoke(serial=pki.serials["car-b"])  # one certificate, by serial number
        await eventually(lambda: shim.server.connected() == set())
        await eventually(lambda: shim.server.metrics.connections_refused["revoked"] >= 4)
        assert not a.connected.is_set() and not b.connected.is_set()
        assert a.stats.connects == 1 and b.stats.connects == 1
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_the_newer_of_two_links_for_one_car_wins(start_shim: Any, pki: Pki, session: aiohttp.ClientSession) -> None:
    shim = await start_shim()
    first = await raw_car(session, shim, pki.car_ctx("car-a"), "car-a")
    second = await raw_car(session, shim, pki.car_ctx("car-a"), "car-a")
    assert await wait_closed(first) == 4000
    assert shim.server.connected() == {"car-a"}
    assert shim.handler.lifecycle("car-a") == [("connected", None), ("disconnected", "replaced"), ("connected", None)]
    assert shim.server.send("car-a", Stop(uid="pod-1", grace_seconds=5))
    stop = await receive_json(second)
    assert (stop["type"], stop["uid"], stop["graceSeconds"]) == ("stop", "pod-1", 5.0)
    await asyncio.sleep(0.1)
    assert shim.handler.lifecycle("car-a")[-1] == ("connected", None)  # the old link's end is not reported


# ---- the car's client ---------------------------------------------------------------------------------------


async def test_car_redials_after_a_shim_restart_says_hello_again_and_the_agent_resends_on_welcome(
    start_shim: Any, pki: Pki
) -> None:
    shim = await start_shim()
    held = [HeldAssignment(uid="pod-1", phase="Running", items_done=60,
                           checkpoint=Checkpoint(sha256=DIGEST, items_done=50))]
    latest = {"status": PodStatus(car="car-a", uid="pod-1", phase="Running", items_done=60,
                                  container=ContainerState(state="running"))}
    welcomes: list[int] = []
    link: CarLink

    def on_welcome() -> None:  # what the agent does: its outbox goes out again on every new connection
        welcomes.append(link.stats.connects)
        asyncio.get_running_loop().create_task(link.send(latest["status"]))

    link = car_link(pki, shim, held=lambda: held, on_welcome=on_welcome)
    link.start()
    try:
        await asyncio.wait_for(link.connected.wait(), 5)
        await eventually(lambda: shim.handler.messages("car-a", "podStatus"))
        await shim.server.stop()
        await eventually(lambda: not link.connected.is_set())
        # The link is a transport: while the shim is away it says it cannot send, and keeps nothing.
        latest["status"] = PodStatus(car="car-a", uid="pod-1", phase="Succeeded", items_done=100,
                                     container=ContainerState(state="terminated", exit_code=0))
        assert not await link.send(latest["status"])
        await asyncio.sleep(0.5)  # a few failed dials, backing off
        assert link.stats.failures >= 2
        restarted = await start_shim(port=shim.port)
        await asyncio.wait_for(link.connected.wait(), 5)
        [(_, _, again)] = [e for e in restarted.handler.events if e[0] == "connected"]
        assert again.assignments == held
        await eventually(lambda: restarted.handler.messages("car-a", "podStatus"))
        [replayed] = restarted.handler.messages("car-a", "podStatus")
        assert (replayed.phase, replayed.items_done) == ("Succeeded", 100)
        assert link.stats.connects == 2 and welcomes == [1, 2]
    finally:
        await link.close()


async def test_car_sends_telemetry_past_a_deadband_and_commands_reach_the_agent(start_shim: Any, pki: Pki) -> None:
    shim = await start_shim()
    link = car_link(pki, shim)
    link.start()
    try:
        await asyncio.wait_for(link.connected.wait(), 5)
        day = "2025-06-02"
        assert link.report_telemetry(telemetry(energy_day=day))
        assert not link.report_telemetry(telemetry(state_of_charge=0.805, battery_temperature_c=20.5, energy_day=day))
        assert not link.report_telemetry(telemetry(energy_today_kwh=0.01, energy_day=day))
        assert link.report_telemetry(telemetry(energy_today_kwh=0.2, energy_day=day))  # today's energy moved
        assert link.report_telemetry(telemetry(drive_state="Driving", energy_today_kwh=0.2, energy_day=day))
        await eventually(lambda: len(shim.handler.messages("car-a", "telemetry")) == 3)
        assert [m.telemetry.drive_state for m in shim.handler.messages("car-a", "telemetry")] == [
            "Parked", "Parked", "Driving"]  # fmt: skip

        for msg in (assign("pod-9"), Stop(uid="pod-9", grace_seconds=0), Ack(uid="pod-9"),
                    OwnerPolicy(policy=Policy(), paused=True, generation=4)):  # fmt: skip
            assert shim.server.send("car-a", msg)
        incoming = link.messages()
        got = [await asyncio.wait_for(anext(incoming), 5) for _ in range(4)]
        assert [m.type for m in got] == ["assign", "stop", "ack", "policy"]
        first, last = got[0], got[3]
        assert isinstance(first, Assign) and isinstance(last, OwnerPolicy)
        assert first.assignment.input.end == 100 and first.grant.token == "t0ken"
        assert last.paused and last.generation == 4
    finally:
        await link.close()


# ---- redirects ----------------------------------------------------------------------------------------------


class TinyShim:
    """A minimal stand-in for a shim replica: reads the hello, answers with its script, records every hello."""

    def __init__(self, pki: Pki, script: Callable[[int], list[BaseModel]]) -> None:
        self.pki = pki
        self.script = script  # hello number (1, 2, ...) -> what to answer; a welcome keeps the link open
        self.hellos: list[Hello] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/v1/link"

    async def start(self) -> TinyShim:
        app = web.Application()
        app.add_routes([web.get("/v1/link", self._handle)])
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.pki.server_ctx())
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        frame = await ws.receive()
        hello = protocol.decode(frame.data, sender="car")
        self.hellos.append(hello)
        answer = self.script(len(self.hellos))
        for msg in answer:
            await ws.send_str(protocol.encode(msg))
        if any(isinstance(m, Welcome) for m in answer):
            async for _ in ws:  # hold the link until the car closes it
                pass
        await ws.close()
        return ws


def welcome(car: str = "car-a") -> Welcome:
    return Welcome(car=car, heartbeat_seconds=5, telemetry_refresh_seconds=300, max_message_bytes=65536)


@pytest.fixture
async def tiny(pki: Pki) -> AsyncIterator[Callable[..., Awaitable[TinyShim]]]:
    started: list[TinyShim] = []

    async def start(script: Callable[[int], list[BaseModel]]) -> TinyShim:
        shim = await TinyShim(pki, script).start()
        started.append(shim)
        return shim

    yield start
    for shim in started:
        await shim.stop()


async def test_a_redirect_takes_the_car_to_the_replica_that_serves_it(pki: Pki, tiny: Any) -> None:
    serving = await tiny(lambda n: [welcome()])
    # The bootstrap replica redirects before the welcome, as a replica does for a car it does not serve.
    bootstrap = await tiny(lambda n: [Redirect(url=serving.url, replica=1)])
    link = car_link(pki, bootstrap.url)
    link.start()
    try:
        await asyncio.wait_for(link.connected.wait(), 5)
        assert len(bootstrap.hellos) == 1 and len(serving.hellos) == 1
        assert link.target == serving.url and link.stats.redirects == 1
    finally:
        await link.close()


async def test_a_redirect_after_the_welcome_moves_the_car_too(pki: Pki, tiny: Any) -> None:
    serving = await tiny(lambda n: [welcome()])
    bootstrap = await tiny(lambda n: [welcome(), Redirect(url=serving.url, replica=2)])  # e.g. rebalancing
    link = car_link(pki, bootstrap.url)
    link.start()
    try:
        await eventually(lambda: len(serving.hellos) == 1)
        await asyncio.wait_for(link.connected.wait(), 5)
        assert link.target == serving.url and len(bootstrap.hellos) == 1
    finally:
        await link.close()


async def test_after_three_failed_dials_to_a_redirected_replica_the_car_goes_back_to_its_bootstrap(
    pki: Pki, tiny: Any
) -> None:
    gone = await tiny(lambda n: [])
    gone_url = gone.url
    await gone.stop()  # the replica it is sent to is not there any more
    bootstrap = await tiny(lambda n: [Redirect(url=gone_url, replica=3)] if n == 1 else [welcome()])
    link = car_link(pki, bootstrap.url)
    link.start()
    try:
        await asyncio.wait_for(link.connected.wait(), 10)
        assert len(bootstrap.hellos) == 2, "back at the bootstrap URL after the redirect failed"
        assert link.target == bootstrap.url
        assert link.stats.failures == REDIRECT_ATTEMPTS
    finally:
        await link.close()


async def test_a_redirect_that_would_drop_tls_is_refused(pki: Pki, tiny: Any) -> None:
    bootstrap = await tiny(lambda n: [Redirect(url="ws://127.0.0.1:1/v1/link", replica=1), welcome()])
    link = car_link(pki, bootstrap.url)
    link.start()
    try:
        await asyncio.wait_for(link.connected.wait(), 5)
        assert link.target == bootstrap.url and link.stats.redirects == 0
    finally:
        await link.close()
