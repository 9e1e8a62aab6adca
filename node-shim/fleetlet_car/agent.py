"""The car agent: one car's logic between its vehicle, its safety reflex, its link to the shim and its sandbox.

What it is for: ``CarAgent`` turns the shim's ``assign``/``stop`` into sandboxed runs and reports what happens
as ``podStatus`` and ``log`` messages. For each assignment it checks ``SafetyReflex.admit``, fetches the model,
the input and any resume checkpoint by digest through the assignment's grant (verified), registers the
sandbox's synchronous kill as a reflex stop callback *before* the child exists, runs it, uploads checkpoints
and the result under the grant, and reports Pending → Running → Succeeded|Failed. It streams telemetry from
vehicle state changes through the link's deadbands, meters the work load for the car's energy accounting, and
keeps a record of the assignments it holds (running, and finished but not known to be reported) for the
``hello`` of the next connection, after which it re-sends their latest status.

It is the same for a real and a simulated car: it reads the car only through ``VehicleInterface``.

What it must never do: await anything on the safety path (the reflex callback only flips flags, sends SIGKILL
and sets the work meter), start a sandbox that the reflex does not guard, let a bad or hostile assignment crash
it (every failure becomes a ``Failed`` status with a reason), log a grant token or URL (bearer credentials), or
import the shim.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from fleetlet.api.v1alpha1 import Telemetry
from fleetlet.artifacts import blob_url
from fleetlet.carlink import protocol
from fleetlet.carlink.protocol import (
    Assign,
    Capacity,
    Checkpoint,
    ContainerState,
    HeldAssignment,
    PodStatus,
    Stop,
)

from .link import CarLink, CarLinkConfig, Command
from .reflex import Refusal, SafetyReflex, StopTrigger
from .runtime import (
    DigestMismatch,
    FetchError,
    Limits,
    Progress,
    Reason,
    RunResult,
    RunSpec,
    SandboxedRun,
    fetch_artifact,
)
from .runtime.results import load_arrays, write_arrays
from .vehicle import SimulatedVehicle, VehicleInterface, VehicleState

log = logging.getLogger(__name__)

AGENT_VERSION = "fleetlet-car/0.1.0"
Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
WorkMeter = Callable[[float], None]
"""Told the car's compute load (0..1 of its compute power) whenever it changes; must be quick and never block."""

EXIT_SIGTERM = 143  # 128 + SIGTERM: stopped gracefully, as a container runtime reports it
EXIT_SIGKILL = 137  # 128 + SIGKILL

# Reason words a pod status carries (CamelCase), for what the reflex refuses or trips on.
ADMISSION_REASONS: dict[str, str] = {
    Refusal.NO_VEHICLE_STATE: "NoVehicleState",
    Refusal.NOT_PARKED: "CarNotParked",
    Refusal.CHARGE_LOW: "BatteryLow",
    Refusal.BATTERY_WARM: "BatteryTooWarm",
    Refusal.COMPUTE_WARM: "ComputeTooWarm",
    Refusal.UNPLUGGED: "CarUnplugged",
}
TRIP_REASONS: dict[str, str] = {
    StopTrigger.NOT_PARKED: "CarLeftParked",
    StopTrigger.CHARGE_BELOW_STOP_FLOOR: "BatteryCritical",
    StopTrigger.BATTERY_OVERHEAT: "BatteryOverheat",
    StopTrigger.COMPUTE_OVERHEAT: "ComputeOverheat",
    StopTrigger.UNPLUGGED: "CarUnplugged",
}
_MAX_HELD = 64  # protocol.Hello.assignments max_length


@dataclass(frozen=True)
class AgentConfig:
    """How an agent runs shards and reports them. Defaults suit a car; tests shorten the intervals."""

    agent_version: str = AGENT_VERSION
    runtimes: tuple[str, ...] = ("onnx",)
    batch_size: int = 64
    threads: int = 1
    checkpoint_every_items: int = 0  # 0 = by time only
    checkpoint_every_seconds: float = 30.0
    memory_bytes: int | None = 2 << 30
    wall_seconds: float | None = None
    allow_network_fallback: bool = False  # see sandbox.py: only when unshare(CLONE_NEWNET) is refused
    status_interval_seconds: float = 2.0  # progress podStatus at most this often per assignment
    log_interval_seconds: float = 5.0  # progress log lines at most this often per assignment
    confirm_seconds: float = 10.0  # a final status counts as delivered once its link stayed up this long
    work_load: float = 1.0  # compute load (0..1) one running shard puts on the car
    http_timeout_seconds: float = 600.0
    upload_attempts: int = 3
    link: CarLinkConfig = field(default_factory=CarLinkConfig)


@dataclass(eq=False)
class _Held:
    """One assignment the car holds. Changed only on the event loop, except ``tripped``/``metered`` (reflex)."""

    assign: Assign
    work_dir: Path
    phase: Phase = "Pending"
    items_done: int = 0
    checkpoint: Checkpoint | None = None
    result_digest: str | None = None
    started_at: datetime | None = None
    last_status: PodStatus | None = None
    final: bool = False
    final_sent: tuple[CarLink, int] | None = None  # (link, its connection number) the final status went out on
    run: SandboxedRun | None = None
    task: asyncio.Task[None] | None = None
    fetch: asyncio.Task[tuple[Path, Path, Path | None]] | None = None
    unguard: Callable[[], None] | None = None  # removes the reflex stop callback
    stop: Stop | None = None
    stopper: asyncio.Task[None] | None = None
    tripped: bool = False  # set by the reflex callback
    metered: bool = False
    log_offset: int = 0
    last_status_at: float = 0.0
    last_log_at: float = 0.0
    loaded: bool = False  # the runner reported an event, so it had loaded the model

    @property
    def uid(self) -> str:
        return self.assign.uid


class _Refused(Exception):
    """An assignment ends before it runs; ``reason`` is the pod status reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class CarAgent:
    """The agent of one car. ``await start()``, then it serves until ``await close()``; all on one event loop.

    ``disconnect()``/``connect()`` drop and redial the link (tests, simulated coverage gaps); what the car holds
    survives them and is announced in the next hello.
    """

    def __init__(
        self,
        name: str,
        vehicle: VehicleInterface,
        reflex: SafetyReflex,
        *,
        shim_url: str,
        ssl_context: ssl.SSLContext,
        capacity: Capacity,
        work_dir: str | Path,
        cache_dir: str | Path | None = None,
        config: AgentConfig | None = None,
        session: aiohttp.ClientSession | None = None,
        work_meter: WorkMeter | None = None,
        work_scale: float = 1.0,
    ) -> None:
        """``session`` (shared by many agents in a simulator) carries the link and the artifact requests; its
        connector's TLS context must trust the store. ``work_meter`` defaults to the simulated car's
        ``set_work`` for a ``SimulatedVehicle`` (a real car measures its own energy). ``work_scale`` scales
        the load told to the meter (a simulator with a sped-up clock passes 1/speedup)."""
        self.name = name
        self.vehicle = vehicle
        self.reflex = reflex
        self.shim_url = shim_url
        self.ssl_context = ssl_context
        self.capacity = capacity
        self.work_dir = Path(work_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.work_dir / "cache"
        self.config = config or AgentConfig()
        self.link: CarLink | None = None
        self._session = session
        self._own_session: aiohttp.ClientSession | None = None
        if work_meter is None and isinstance(vehicle, SimulatedVehicle):
            work_meter = vehicle.car.set_work
        self._work_meter = work_meter
        self._work_scale = work_scale
        self._held: dict[str, _Held] = {}
        self._unsubscribe: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._resend: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.last_telemetry: Telemetry | None = None
        self.hellos = 0  # hellos sent (connection attempts that got as far as hello)

    # ---- lifecycle --------------------------------------------------------------------------------------

    async def start(self, *, connect: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self._session is None:
            self._own_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._artifact_ssl()))
        # The reflex first: it hears every change before anything else does.
        self._unsubscribe.append(self.reflex.attach(self.vehicle))
        self._unsubscribe.append(self.vehicle.subscribe(self._on_vehicle))
        self._on_vehicle(self.vehicle.state())
        if connect:
            self.connect()

    def connect(self) -> None:
        """Start dialling the shim (no-op while a link exists)."""
        if self.link is not None or self._closed:
            return
        link = CarLink(
            self.shim_url,
            self.name,
            self.ssl_context,
            agent_version=self.config.agent_version,
            runtimes=self.config.runtimes,
            capacity=self.capacity,
            held=self.held_assignments,
            on_message=self._on_command,
            config=self.config.link,
            session=self.session,
        )
        self.link = link
        if self.last_telemetry is not None:
            link.report_telemetry(self.last_telemetry)
        link.start()

    async def disconnect(self) -> None:
        """Drop the link (work goes on; reports wait for the next connection)."""
        link, self.link = self.link, None
        if link is not None:
            await link.close()

    async def close(self, *, grace_seconds: float = 0.0) -> None:
        """Stop every run (gracefully within ``grace_seconds``, else at once), drop the link, let go of the car."""
        self._closed = True
        for h in list(self._held.values()):
            if h.run is not None and not h.final:
                h.stop = h.stop or Stop(uid=h.uid, grace_seconds=grace_seconds, reason="AgentShutdown")
                self._stop_run(h, grace_seconds)
            if h.fetch is not None:
                h.fetch.cancel()
        running = [h.task for h in self._held.values() if h.task is not None and not h.task.done()]
        if running:
            await asyncio.wait(running, timeout=grace_seconds + 10.0)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        await self.disconnect()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        self._set_meter()
        if self._own_session is not None:
            await self._own_session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        session = self._session or self._own_session
        assert session is not None, "start() the agent first"
        return session

    def _store_ssl(self, base_url: str) -> ssl.SSLContext | None:
        """The car's own mTLS context when the store is the shim's car listener (which demands a car
        certificate); None (the session's default) for another store, e.g. S3."""
        store, shim = urlsplit(base_url), urlsplit(self.shim_url)
        if (store.hostname, store.port) == (shim.hostname, shim.port):
            return self.ssl_context
        return None

    def _artifact_ssl(self) -> ssl.SSLContext:
        # The link's context trusts only the fleet CA; the store may also be a public S3 endpoint.
        ctx = ssl.create_default_context()
        for ca in self.ssl_context.get_ca_certs(binary_form=True):
            ctx.load_verify_locations(cadata=ssl.DER_cert_to_PEM_cert(ca))
        return ctx

    # ---- what others read -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.connected.is_set()

    @property
    def running(self) -> int:
        return sum(1 for h in self._held.values() if h.phase == "Running" and not h.final)

    def assignment(self, uid: str) -> HeldAssignment | None:
        h = self._held.get(uid)
        return self._describe(h) if h is not None else None

    def held_assignments(self) -> list[HeldAssignment]:
        """What the next hello lists: running and pending work first, then finals not known to be reported.

        Called by the link just before each hello; it also schedules the re-sending of their latest status
        once the shim has welcomed the car.
        """
        self.hellos += 1
        live = [h for h in self._held.values() if not h.final]
        done = [h for h in self._held.values() if h.final]
        held = (live + done)[:_MAX_HELD]
        if held and self.link is not None:
            if self._resend is not None:
                self._resend.cancel()
            self._resend = self._spawn(self._resend_after_welcome(self.link, [h.uid for h in held]))
        return [self._describe(h) for h in held]

    @staticmethod
    def _describe(h: _Held) -> HeldAssignment:
        return HeldAssignment(
            uid=h.uid, phase=h.phase, items_done=h.items_done, checkpoint=h.checkpoint, result_digest=h.result_digest
        )

    # ---- vehicle ----------------------------------------------------------------------------------------

    def _on_vehicle(self, state: VehicleState) -> None:
        """Vehicle observer: may run on the vehicle bus's thread; telemetry is handed to the loop."""
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._report_telemetry, state)
        else:
            self._report_telemetry(state)

    def _report_telemetry(self, state: VehicleState) -> None:
        telemetry = Telemetry(
            state_of_charge=min(max(state.state_of_charge, 0.0), 1.0),
            plugged_in=state.plugged_in,
            charging=state.charging,
            drive_state=state.drive_state,
            battery_temperature_c=min(max(state.battery_temperature_c, -60.0), 150.0),
            compute_temperature_c=min(max(state.compute_temperature_c, -60.0), 150.0),
            link_quality=min(max(state.link_quality, 0.0), 1.0),
            observed_at=state.observed_at,
        )
        self.last_telemetry = telemetry
        if self.link is not None:
            self.link.report_telemetry(telemetry)

    def _set_meter(self) -> None:
        """Tell the car the compute load now. Synchronous and cheap: the reflex callback calls it."""
        if self._work_meter is None:
            return
        n = sum(1 for h in tuple(self._held.values()) if h.metered)
        load = min(1.0, n * self.config.work_load) * self._work_scale
        try:
            self._work_meter(min(max(load, 0.0), 1.0))
        except Exception:
            log.exception("car %s: the work meter failed", self.name)

    # ---- commands from the shim -------------------------------------------------------------------------

    async def _on_command(self, cmd: Command) -> None:
        # Runs inside the link's read loop: hand off at once, never await work here.
        if isinstance(cmd, Assign):
            self._on_assign(cmd)
        elif isinstance(cmd, Stop):
            self._on_stop(cmd)
        else:
            log.warning("car %s: the shim refused a message (%s): %s", self.name, cmd.code, cmd.message)

    def _on_assign(self, msg: Assign) -> None:
        h = self._held.get(msg.uid)
        if h is not None:
            if h.final and h.last_status is not None:
                log.info("car %s: %s assigned again after it ended; re-sending its final status", self.name, msg.uid)
                self._spawn(self._send_status(h, h.last_status))
            return
        if self._closed:
            return
        h = _Held(msg, self.work_dir / "runs" / msg.uid)
        self._held[msg.uid] = h
        log.info("car %s: assigned %s/%s (uid %s, items %d..%d)", self.name, msg.namespace, msg.name, msg.uid,
                 msg.shard.input.start, msg.shard.input.end)
        h.task = asyncio.create_task(self._execute(h), name=f"shard-{self.name}-{msg.uid}")

    def _on_stop(self, msg: Stop) -> None:
        h = self._held.get(msg.uid)
        if h is None:
            log.debug("car %s: stop for %s, which it does not hold", self.name, msg.uid)
            return
        if h.final:  # the shim no longer wants to hear about it (e.g. the pod is gone)
            self._held.pop(msg.uid, None)
            return
        if h.stop is None:
            h.stop = msg
            log.info("car %s: stopping %s (%s, grace %.0f s)", self.name, msg.uid, msg.reason or "Stop",
                     msg.grace_seconds)
        if h.fetch is not None:
            h.fetch.cancel()
        if h.run is not None and h.phase == "Running":
            self._stop_run(h, msg.grace_seconds)

    def _stop_run(self, h: _Held, grace: float) -> None:
        run = h.run
        if run is None:
            return
        if grace <= 0:
            run.kill_now()
            return
        if h.stopper is None or h.stopper.done():
            h.stopper = self._spawn(self._graceful_stop(run, grace))

    async def _graceful_stop(self, run: SandboxedRun, grace: float) -> None:
        # SandboxedRun.stop() waits its own spec's grace; the shim's grace (the pod's) rules here.
        stopping = asyncio.create_task(run.stop())
        done, _ = await asyncio.wait({stopping}, timeout=grace)
        if not done:
            run.kill_now()
        with contextlib.suppress(Exception):
            await stopping

    # ---- one assignment ---------------------------------------------------------------------------------

    async def _execute(self, h: _Held) -> None:
        try:
            await self._run_assignment(h)
        except _Refused as r:
            await self._finish(h, "Failed", r.reason, r.message)
        except asyncio.CancelledError:
            if h.run is not None:
                h.run.kill_now()
            raise
        except Exception as e:
            log.exception("car %s: assignment %s failed inside the agent", self.name, h.uid)
            if h.run is not None:
                h.run.kill_now()
            await self._finish(h, "Failed", "AgentError", f"the car agent failed: {type(e).__name__}: {e}"[:1000])
        finally:
            if h.unguard is not None:
                h.unguard()
                h.unguard = None
            if h.metered:
                h.metered = False
                self._set_meter()
            with contextlib.suppress(OSError):
                await asyncio.to_thread(shutil.rmtree, h.work_dir, True)
        if h.final and not self._closed:
            self._spawn(self._confirm(h))

    async def _run_assignment(self, h: _Held) -> None:
        a, cfg = h.assign, self.config
        self._admit()
        shard = a.shard
        if shard.model.runtime not in cfg.runtimes:
            raise _Refused("UnsupportedRuntime", f"this car does not offer the {shard.model.runtime!r} runtime")
        if shard.input.format not in ("npy", "npz"):
            raise _Refused("InputError", f"input format {shard.input.format!r} is not npy or npz")
        await self._report(h, "Pending", "waiting", reason="ContainerCreating", message="fetching the model and input")
        await self._log(h, f"assigned items {shard.input.start}..{shard.input.end} of sha256:{shard.input.digest}")

        h.fetch = asyncio.create_task(self._fetch_all(h))
        try:
            model_path, input_path, resume_path = await h.fetch
        except asyncio.CancelledError:
            if h.stop is None:
                raise
        if h.stop is not None:
            raise _Refused("Stopped", f"stopped before it ran ({h.stop.reason or 'Stop'})")

        spec = RunSpec(
            model_path=model_path,
            input_path=input_path,
            work_dir=h.work_dir / "sandbox",
            input_format=shard.input.format,  # type: ignore[arg-type]
            model_sha256=shard.model.digest,
            input_sha256=shard.input.digest if input_path.name == shard.input.digest else None,
            batch_size=cfg.batch_size,
            threads=cfg.threads,
            checkpoint_every_items=cfg.checkpoint_every_items,
            checkpoint_every_seconds=cfg.checkpoint_every_seconds,
            limits=Limits(memory_bytes=cfg.memory_bytes, wall_seconds=cfg.wall_seconds),
            allow_network_fallback=cfg.allow_network_fallback,
            use_accelerator=bool(shard.resources.accelerator),
            resume_from=resume_path,
        )
        run = SandboxedRun(spec)
        h.run = run

        def on_trip() -> None:  # the safety path: flags, SIGKILL, meter; nothing that waits
            h.tripped = True
            run.kill_now()
            if h.metered:
                h.metered = False
                self._set_meter()

        # Guard first, then ask: if the reflex is already tripped the callback fires at once.
        h.unguard = self.reflex.add_stop_callback(on_trip)
        self._admit()
        if h.tripped:
            raise _Refused(self._trip_reason(), "the car stopped being safe to work on before the shard started")
        try:
            await run.start()
        except OSError as e:
            raise _Refused("SandboxUnavailable", f"the sandbox could not start: {e}") from e
        if h.tripped:  # the reflex fired while the child was being created (kill_now had no process yet)
            run.kill_now()
        h.phase = "Running"
        h.started_at = datetime.now(UTC)
        if not h.tripped:
            h.metered = True
            self._set_meter()
        await self._report(h, "Running", "running")
        await self._log(h, f"started the sandboxed runner (pid {run.pid})")
        if h.stop is not None:
            self._stop_run(h, h.stop.grace_seconds)

        async for ev in run.events():
            await self._on_progress(h, ev)
        result = await run.wait()
        if h.metered:
            h.metered = False
            self._set_meter()
        await self._conclude(h, result)

    def _admit(self) -> None:
        admission = self.reflex.admit()
        if not admission.allowed:
            first = admission.reasons[0]
            raise _Refused(
                ADMISSION_REASONS.get(first, "CarNotAvailable"),
                f"the car cannot take work now ({', '.join(admission.reasons)}); schedule it elsewhere",
            )

    def _trip_reason(self) -> str:
        trip = self.reflex.last_trip
        triggers = trip.triggers if trip is not None else self.reflex.latched_triggers
        if StopTrigger.NOT_PARKED in triggers:
            return TRIP_REASONS[StopTrigger.NOT_PARKED]
        for t in sorted(triggers):
            return TRIP_REASONS.get(t, "SafetyStop")
        return "SafetyStop"

    async def _fetch_all(self, h: _Held) -> tuple[Path, Path, Path | None]:
        a = h.assign
        shard = a.shard

        async def get(digest: str, what: str) -> Path:
            url = blob_url(a.grant.base_url, digest, a.grant.token)
            try:
                path = await fetch_artifact(
                    url, digest, self.cache_dir, session=self.session, ssl=self._store_ssl(a.grant.base_url),
                    http_timeout=aiohttp.ClientTimeout(total=self.config.http_timeout_seconds, sock_read=60),
                )  # fmt: skip
            except DigestMismatch as e:
                raise _Refused("DigestMismatch", f"{what}: {e}") from None
            except FetchError as e:
                raise _Refused("FetchFailed", f"{what}: {e}") from None
            await self._log(h, f"fetched {what} sha256:{digest}")
            return path

        wanted = [get(shard.model.digest, "model"), get(shard.input.digest, "input")]
        if a.resume_from is not None:
            wanted.append(get(a.resume_from.digest, "checkpoint"))
        paths = await asyncio.gather(*wanted)
        input_path = await asyncio.to_thread(_slice_input, paths[1], shard.input.format, shard.input.start,
                                             shard.input.end, h.work_dir)
        resume = paths[2] if len(paths) > 2 else None
        if resume is not None and a.resume_from is not None:
            h.checkpoint = a.resume_from
            h.items_done = a.resume_from.items_done
        return paths[0], input_path, resume

    async def _on_progress(self, h: _Held, ev: Progress) -> None:
        now = time.monotonic()
        h.items_done = ev.items_done
        if not h.loaded:
            h.loaded = True
            await self._log(h, f"loaded model sha256:{h.assign.shard.model.digest}")
        if ev.kind == "checkpoint" and ev.checkpoint_path is not None and not h.tripped:
            ck = await self._upload_checkpoint(h, ev.checkpoint_path)
            if ck is not None:
                await self._log(h, f"checkpoint at {ck.items_done}/{ev.items_total} items sha256:{ck.digest}")
                await self._report(h, "Running", "running")
                h.last_status_at = now
            return
        if ev.kind == "resumed":
            await self._log(h, f"resumed from the checkpoint at {ev.items_done}/{ev.items_total} items")
        if now - h.last_log_at >= self.config.log_interval_seconds:
            h.last_log_at = now
            await self._log(h, f"items {ev.items_done}/{ev.items_total}")
        if now - h.last_status_at >= self.config.status_interval_seconds:
            h.last_status_at = now
            await self._report(h, "Running", "running")

    async def _conclude(self, h: _Held, result: RunResult) -> None:
        h.items_done = result.items_done
        if result.reason is Reason.COMPLETED and result.result_path is not None and result.result_sha256:
            await self._log(h, f"items {result.items_done}/{result.items_total}")
            try:
                await self._upload(h, result.result_sha256, await asyncio.to_thread(result.result_path.read_bytes))
            except _Refused as r:
                await self._finish(h, "Failed", r.reason, r.message, exit_code=0)
                return
            h.result_digest = result.result_sha256
            await self._log(h, f"result sha256:{result.result_sha256}")
            await self._finish(h, "Succeeded", "Completed", f"{result.items_done} items in "
                               f"{result.duration_seconds:.1f} s", exit_code=0)
            return
        if result.checkpoint_path is not None:
            await self._upload_checkpoint(h, result.checkpoint_path)
        resume = f"; resume from the checkpoint at {h.checkpoint.items_done} items" if h.checkpoint else ""
        if h.tripped:
            reason = self._trip_reason()
            state = self.vehicle.state()
            message = (f"the car's safety reflex killed the shard at once ({reason}, drive state "
                       f"{state.drive_state}) after {h.items_done} items{resume}")
            exit_code = EXIT_SIGKILL
        elif h.stop is not None:
            reason = "Stopped"
            graceful = result.reason is Reason.STOPPED
            exit_code = EXIT_SIGTERM if graceful else EXIT_SIGKILL
            how = "gracefully" if graceful else "by SIGKILL after its grace period"
            message = f"stopped {how} ({h.stop.reason or 'Stop'}) after {h.items_done} items{resume}"
        else:
            reason = result.reason.value
            exit_code = result.exit_code if result.exit_code is not None else 128 + (result.signal or 9)
            message = f"{result.message}{resume}"
        await self._log(h, f"ended: {reason}: {message}"[:4096])
        await self._finish(h, "Failed", reason, message, exit_code=exit_code)

    # ---- artifacts --------------------------------------------------------------------------------------

    async def _upload_checkpoint(self, h: _Held, path: Path) -> Checkpoint | None:
        try:
            snap = await asyncio.to_thread(_read_checkpoint, path)
        except (OSError, ValueError, KeyError) as e:
            log.warning("car %s: checkpoint of %s unreadable (%s); keeping the previous one", self.name, h.uid, e)
            return None
        data, items_done = snap
        digest = hashlib.sha256(data).hexdigest()
        if h.checkpoint is not None and h.checkpoint.digest == digest:
            return h.checkpoint
        try:
            await self._upload(h, digest, data)
        except _Refused as r:
            log.warning("car %s: checkpoint of %s not uploaded: %s", self.name, h.uid, r.message)
            return None
        h.checkpoint = Checkpoint(digest=digest, items_done=items_done)
        return h.checkpoint

    async def _upload(self, h: _Held, digest: str, data: bytes) -> None:
        grant = h.assign.grant
        url = blob_url(grant.base_url, digest, grant.token)
        timeout = aiohttp.ClientTimeout(total=self.config.http_timeout_seconds, sock_read=60)
        problem = ""
        for attempt in range(self.config.upload_attempts):
            if attempt:
                await asyncio.sleep(min(2.0**attempt, 10.0))
            try:
                ctx = self._store_ssl(grant.base_url)
                extra = {"ssl": ctx} if ctx is not None else {}
                async with self.session.put(url, data=data, timeout=timeout, **extra) as resp:
                    if resp.status in (200, 201):
                        return
                    problem = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    if resp.status in (400, 403, 413):
                        break  # the grant or the bytes are wrong: retrying cannot help
            except (aiohttp.ClientError, TimeoutError) as e:
                problem = f"{type(e).__name__}: {e}"
        raise _Refused("UploadFailed", f"uploading sha256:{digest} to the artifact store failed: {problem}")

    # ---- reports ----------------------------------------------------------------------------------------

    async def _report(
        self,
        h: _Held,
        phase: Phase,
        state: Literal["waiting", "running", "terminated"],
        *,
        reason: str | None = None,
        message: str | None = None,
        exit_code: int | None = None,
    ) -> None:
        h.phase = phase
        status = PodStatus(
            car=self.name,
            uid=h.uid,
            phase=phase,
            container=ContainerState(
                state=state,
                exit_code=exit_code,
                reason=reason,
                message=message[:1024] if message else None,
                started_at=h.started_at if state != "waiting" else None,
                finished_at=datetime.now(UTC) if state == "terminated" else None,
            ),
            items_done=h.items_done,
            checkpoint=h.checkpoint,
            result_digest=h.result_digest,
        )
        h.last_status = status
        await self._send_status(h, status)

    async def _send_status(self, h: _Held, status: PodStatus) -> None:
        link = self.link
        if link is None:
            return  # kept as h.last_status; re-sent after the next hello
        await link.send(status)
        if h.final and link.connected.is_set():
            h.final_sent = (link, link.stats.connects)

    async def _finish(
        self, h: _Held, phase: Phase, reason: str, message: str, *, exit_code: int | None = None
    ) -> None:
        h.final = True
        level = logging.INFO if phase == "Succeeded" else logging.WARNING
        log.log(level, "car %s: %s %s: %s: %s", self.name, h.uid, phase, reason, message)
        await self._report(h, phase, "terminated", reason=reason, message=message, exit_code=exit_code)

    async def _log(self, h: _Held, *lines: str) -> None:
        link = self.link
        offset = h.log_offset
        h.log_offset += len(lines)
        if link is None:
            return
        with contextlib.suppress(ValueError):
            await link.send(protocol.Log(car=self.name, uid=h.uid, offset=offset, lines=[ln[:4096] for ln in lines]))

    async def _confirm(self, h: _Held) -> None:
        """Forget a final status once the link it went out on stayed up ``confirm_seconds`` (so it was read)."""
        if not h.final or self._closed:
            return
        await asyncio.sleep(self.config.confirm_seconds)
        sent = h.final_sent
        if sent is None:
            return
        link, connects = sent
        if link is self.link and link.connected.is_set() and link.stats.connects == connects:
            if self._held.get(h.uid) is h:
                del self._held[h.uid]

    async def _resend_after_welcome(self, link: CarLink, uids: Iterable[str]) -> None:
        before = link.stats.connects
        try:
            async with asyncio.timeout(link.config.connect_timeout_seconds + link.config.welcome_timeout_seconds):
                await link.connected.wait()
        except TimeoutError:
            return
        if link is not self.link or link.stats.connects == before:
            return
        finals: list[_Held] = []
        for uid in uids:
            h = self._held.get(uid)
            if h is not None and h.last_status is not None:
                await self._send_status(h, h.last_status)
                if h.final:
                    finals.append(h)
        for h in finals:
            self._spawn(self._confirm(h))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _read_checkpoint(path: Path) -> tuple[bytes, int]:
    """The checkpoint's bytes (one consistent version: the runner replaces it atomically) and items done."""
    data = path.read_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return data, int(z["__done__"])


def _slice_input(path: Path, fmt: str, start: int, end: int, work_dir: Path) -> Path:
    """The input file for items ``[start, end)``: the artifact itself when it is exactly that range."""
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if fmt == "npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            total = arr.shape[0] if arr.ndim else 0
            if start == 0 and end == total:
                return path
            if end > total:
                raise _Refused("InputError", f"items {start}..{end} asked of an input of {total} items")
            out = work_dir / "input.npy"
            write_arrays(out, {"x": np.ascontiguousarray(arr[start:end])})
            return out
        arrays = load_arrays(path)
        totals = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
        if len(totals) != 1:
            raise _Refused("InputError", "the npz input's arrays do not share axis 0")
        (total,) = totals
        if start == 0 and end == total:
            return path
        if end > total:
            raise _Refused("InputError", f"items {start}..{end} asked of an input of {total} items")
        out = work_dir / "input.npz"
        write_arrays(out, {k: a[start:end] for k, a in arrays.items()})
        return out
    except _Refused:
        raise
    except (OSError, ValueError) as e:
        raise _Refused("InputError", f"cannot read the input: {e}") from None
