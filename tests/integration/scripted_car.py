"""A car under a test's exact control: it speaks the car-link protocol itself (its own certificate, hello,
telemetry, pod status, acks), with no agent or sandbox behind it.

For tests about what the shim does with a car's words (ack only after the status is stored, re-send a stop, give
up on a car that never confirms), the replies must be exact and instant; the real agent is exercised by the
end-to-end pod tests. Test infrastructure: production code never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import aiohttp

from fleetlet.api.v1alpha1 import Telemetry
from fleetlet.carlink import protocol
from fleetlet.carlink.protocol import (
    Capacity,
    Checkpoint,
    ContainerState,
    HeldAssignment,
    Hello,
    PodStatus,
    TelemetryReport,
)
from fleetlet.cli.local import ShimHandle

PARKED = {"stateOfCharge": 0.9, "pluggedIn": True, "driveState": "Parked", "batteryTemperatureC": 20.0,
          "computeTemperatureC": 30.0}


class ScriptedCar:
    def __init__(self, shim: ShimHandle, name: str, hardware: dict[str, Any], url: str | None = None) -> None:
        self.shim = shim
        self.name = name
        self.hardware = hardware
        self.url = url or shim.link_url
        self.inbox: list[Any] = []
        self.closed_with: int | None = None  # the close code once the link closed (-1: closed without one)
        self._seq = 0
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()

    async def connect(self, held: Iterable[HeldAssignment] = (), telemetry: dict[str, Any] | None = None,
                      expect_welcome: bool = True) -> None:
        crt, key = self.shim.car_cert(self.name)
        ctx = ssl.create_default_context(cafile=str(self.shim.fleet_ca_file))
        ctx.load_cert_chain(crt, key)
        self._session = self._session or aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self.url, ssl=ctx)
        self._seq = 0
        self.closed_with = None
        self._reader = asyncio.create_task(self._read(self._ws))
        hw = self.hardware
        await self.send(Hello(car=self.name, agent_version="scripted-car/1", runtimes=["onnx"],
                              capacity=Capacity(cpu=hw["cpu"], memory=hw["memory"],
                                                accelerators=hw.get("accelerators", [])),
                              assignments=list(held)))
        if expect_welcome:
            await self.wait_for("welcome", timeout_s=20)
            await self.telemetry(**(telemetry or {}))

    async def disconnect(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._reader, 5)
        self._ws = None

    async def close(self) -> None:
        await self.disconnect()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, msg: Any) -> None:
        assert self._ws is not None, "connect() first"
        self._seq += 1
        await self._ws.send_str(protocol.encode(msg.model_copy(update={"seq": self._seq})))

    async def telemetry(self, **fields: Any) -> None:
        body = {**PARKED, **fields, "observedAt": datetime.now(UTC).isoformat()}
        await self.send(TelemetryReport(car=self.name, telemetry=Telemetry.model_validate(body)))

    async def report(self, uid: str, phase: str, *, items_done: int = 0, result: str | None = None,
                     reason: str | None = None, checkpoint: tuple[str, int] | None = None) -> None:
        state = {"Pending": "waiting", "Running": "running"}.get(phase, "terminated")
        now = datetime.now(UTC)
        await self.send(PodStatus(
            car=self.name, uid=uid, phase=phase, items_done=items_done, result_digest=result,  # type: ignore[arg-type]
            checkpoint=Checkpoint(sha256=checkpoint[0], items_done=checkpoint[1]) if checkpoint else None,
            container=ContainerState(state=state, exit_code=0 if phase == "Succeeded" else (1 if state ==  # type: ignore[arg-type]
                                     "terminated" else None), reason=reason, started_at=now,
                                     finished_at=now if state == "terminated" else None)))

    def received(self, type_: str, uid: str | None = None) -> list[Any]:
        return [m for m in self.inbox if m.type == type_ and (uid is None or getattr(m, "uid", None) == uid)]

    async def wait_for(self, type_: str, uid: str | None = None, timeout_s: float = 30.0, count: int = 1) -> Any:
        """The ``count``-th message of this type (about ``uid``) received since connecting."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            got = self.received(type_, uid)
            if len(got) >= count:
                return got[count - 1]
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                seen = [m.type for m in self.inbox]
                raise AssertionError(f"{self.name}: no {type_} {uid or ''} within {timeout_s}s (got {seen})")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(left, 0.5))

    async def wait_for_any(self, types: tuple[str, ...], timeout_s: float = 30.0) -> Any:
        """The first message of any of ``types`` received since the inbox was last cleared."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            got = [m for m in self.inbox if m.type in types]
            if got:
                return got[0]
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or (self.closed_with is not None and not got):
                raise AssertionError(f"{self.name}: none of {types} (closed with {self.closed_with}, "
                                     f"got {[m.type for m in self.inbox]})")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(left, 0.5))

    async def wait_for_assign(self, pod: str, timeout_s: float = 30.0) -> Any:
        """The ``assign`` for pod ``pod``."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            got = [m for m in self.inbox if m.type == "assign" and m.name == pod]
            if got:
                return got[0]
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{self.name}: no assign for {pod} within {timeout_s}s")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), 0.5)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for frame in ws:
                if frame.type is aiohttp.WSMsgType.TEXT:
                    self.inbox.append(protocol.decode(frame.data, sender="shim"))
                    self._arrived.set()
        finally:
            self.closed_with = ws.close_code if ws.close_code is not None else -1
            self._arrived.set()
