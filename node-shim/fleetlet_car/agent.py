"""The car agent: one car's orchestration between its vehicle, its safety reflex, its link, its work and its owner.

What it is for: ``CarAgent`` wires the car's parts together and decides nothing they decide themselves:

- vehicle → safety reflex (which stops work the instant it must) and telemetry (with the work energy metered
  today in the owner's time zone) to the link;
- link commands → the assignment state machine (``assignments.Assignments``: what each assignment is doing and
  what the shim must be told);
- each new assignment: admission (the reflex's ``admit()`` and the owner's rules, ``fleetlet.policy``), the
  artifact client (fetch by digest through the grant), the runner (``runtime.Runner``: the sandbox by default;
  the pod's resources become its limits, its accelerator its execution provider), progress, checkpoints and the
  result uploaded, energy metered per assignment;
- the owner's rules on the car (``policy`` messages): new work refused while they forbid it, running work
  drained gracefully (SIGTERM → checkpoint) when they start to, checked on every vehicle change, every policy
  and at the next instant the answer changes by time or energy alone (one timer per agent);
- one delivery mechanism: the outbox is the state machine's latest status of every held assignment, sent when
  it changes (progress at most every ``status_interval_seconds``), re-sent after every welcome, and dropped only
  when the shim acks it.

It is the same for a real and a SIMULATED car: it reads the car only through ``VehicleInterface``, is told
the car's compute load through an injected work meter, and computes through an injected ``Runner``.

What it must never do: await anything on the safety path (the reflex callback only sends SIGKILL, flips a flag
and stops metering), start work that the reflex does not guard or that the owner's rules forbid, let a bad or
hostile assignment crash it (every failure becomes a ``Failed`` status with a reason), log a grant token or URL
(bearer credentials), or import the shim or the simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from fleetlet.api.v1alpha1 import Telemetry
from fleetlet.api.v1alpha1.shard import ShardCheckpoint
from fleetlet.api.v1alpha1.vehiclenode import Policy
from fleetlet.carlink import protocol
from fleetlet.carlink.protocol import Ack, Assign, Capacity, HeldAssignment, OwnerPolicy, Stop
from fleetlet.policy import CarPolicy, evaluate

from .artifact_client import ArtifactClient, ArtifactFailure
from .assignments import AckResult, Assignments, RunEnd, StopAction
from .energy import EnergyMeter
from .link import CarLink, CarLinkConfig, Command
from .reflex import Refusal, SafetyReflex, StopTrigger
from .runtime import Limits, Progress, Reason, Run, Runner, RunResult, RunSpec, SandboxRunner, ShardRef
from .runtime.inputs import InputError, read_checkpoint, slice_input
from .runtime.providers import accelerator_missing_message
from .runtime.resources import CpuAllocator, cpu_threads, memory_bytes
from .vehicle import VehicleInterface, VehicleState

log = logging.getLogger(__name__)

AGENT_VERSION = "fleetlet-car/0.2.0"
WorkMeter = Callable[[float], None]
"""Told the car's compute load (0..1 of its compute power) whenever it changes; must be quick and never block."""
PolicyEvaluator = Callable[..., CarPolicy]
"""``fleetlet.policy.evaluate`` (tests may pass a stand-in with the same signature)."""

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
_ENERGY_FILE = "energy.json"
_RETRY_SECONDS = 0.5  # a full link queue drains in well under this


@dataclass(frozen=True)
class AgentConfig:
    """How an agent runs shards and reports them. Defaults suit a car; tests shorten the intervals.

    The pod decides its own threads, memory and accelerator (its resources); these are the car's settings."""

    agent_version: str = AGENT_VERSION
    runtimes: tuple[str, ...] = ("onnx",)
    batch_size: int = 64
    checkpoint_every_items: int = 0  # 0 = by time only
    checkpoint_every_seconds: float = 30.0
    wall_seconds: float | None = None
    allow_network_fallback: bool = False  # see sandbox.py: only when unshare(CLONE_NEWNET) is refused
    status_interval_seconds: float = 2.0  # progress-only podStatus at most this often per assignment
    log_interval_seconds: float = 5.0  # progress log lines at most this often per assignment
    drain_grace_seconds: float = 30.0  # the owner's rules stop running work gracefully within this
    work_load: float = 1.0  # compute load (0..1) one running shard puts on the car
    compute_power_w: float = 100.0  # the computer's draw at full load, W (hardware.computePowerW)
    idle_power_w: float = 0.0  # the car kept awake for work, W (hardware.idlePowerW)
    http_timeout_seconds: float = 600.0
    upload_attempts: int = 3
    link: CarLinkConfig = field(default_factory=CarLinkConfig)


@dataclass(eq=False)
class _Work:
    """The agent's handles on one assignment's work (its logical state lives in the state machine).
    Changed on the event loop only, except ``tripped`` (the reflex callback)."""

    uid: str
    work_dir: Path
    task: asyncio.Task[None] | None = None
    fetch: asyncio.Task[tuple[Path, Path, Path | None]] | None = None
    run: Run | None = None
    unguard: Callable[[], None] | None = None  # removes the reflex stop callback
    stopper: asyncio.Task[None] | None = None
    cpus: tuple[int, ...] = ()
    tripped: bool = False
    log_offset: int = 0
    last_log_at: float = 0.0
    loaded: bool = False  # the runner reported an event, so it had loaded the model


class _Refused(Exception):
    """An assignment ends before it runs; ``reason`` is the pod status reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class CarAgent:
    """The agent of one car. ``await start()``, then it serves until ``await close()``; all on one event loop.

    ``disconnect()``/``connect()`` drop and redial the link (tests, simulated coverage gaps); what the car holds
    survives them, is announced in the next hello and its statuses are re-sent until acked.
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
        runner: Runner | None = None,
        policy: Policy | None = None,
        paused: bool = False,
        clock: Callable[[], float] = time.time,
        evaluate_policy: PolicyEvaluator = evaluate,
        cpus: CpuAllocator | None = None,
    ) -> None:
        """``session`` (shared by many agents in a simulator) carries the link and the artifact requests; its
        connector's TLS context must trust the store. ``work_meter`` is told the car's compute load (a
        simulated car's physics meters its battery with it); ``work_scale`` scales that load (a simulator
        with a sped-up clock passes 1/speedup). ``runner`` computes shards (default: the sandbox). ``policy``
        and ``paused`` are the owner's rules until the shim sends its own (default: the reflex's policy).
        ``clock`` (POSIX seconds) drives energy metering and the owner's hours. ``cpus`` hands out the CPUs
        sandboxes are pinned to; agents sharing a machine (a simulator) must share one."""
        self.name = name
        self.vehicle = vehicle
        self.reflex = reflex
        self.shim_url = shim_url
        self.ssl_context = ssl_context
        self.capacity = capacity
        self.work_dir = Path(work_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.work_dir / "cache"
        self.config = cfg = config or AgentConfig()
        self.link: CarLink | None = None
        self.runner: Runner = runner or SandboxRunner()
        self.providers: tuple[str, ...] = ()
        self.policy = policy or reflex.policy
        self.paused = paused
        self.policy_generation: int | None = None
        self.assignments = Assignments(name, now=lambda: datetime.fromtimestamp(clock(), UTC))
        self.meter = EnergyMeter(cfg.compute_power_w, cfg.idle_power_w, work_load=cfg.work_load,
                                 timezone=self.policy.timezone, clock=clock)  # fmt: skip
        self.artifacts = ArtifactClient(
            lambda: self.session, self.cache_dir, car_ssl=ssl_context, shim_url=shim_url,
            timeout_seconds=cfg.http_timeout_seconds, upload_attempts=cfg.upload_attempts,
        )  # fmt: skip
        self._clock = clock
        self._evaluate = evaluate_policy
        self._session = session
        self._own_session: aiohttp.ClientSession | None = None
        self._work_meter = work_meter
        self._work_scale = work_scale
        self._work: dict[str, _Work] = {}
        self._cpus = cpus or CpuAllocator(tuple(sorted(os.sched_getaffinity(0))))
        self._state: VehicleState | None = None
        self._car_policy: CarPolicy | None = None
        self._policy_timer: asyncio.TimerHandle | None = None
        self._sent: dict[str, tuple[int, int, float]] = {}  # uid -> (version, milestone, when) last queued
        self._retry_at = 0.0  # the link refused a status: not before this (monotonic)
        self._wake: asyncio.Event | None = None
        self._deliverer: asyncio.Task[None] | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.last_telemetry: Telemetry | None = None
        self.hellos = 0  # hellos sent (connection attempts that got as far as hello)
        self.runs_started = 0  # sandboxed runs started (tests count work done twice with it)

    # ---- lifecycle --------------------------------------------------------------------------------------

    async def start(self, *, connect: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        if self._session is None:
            self._own_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._artifact_ssl()))
        await self._load_energy()
        self.providers = await self.runner.providers()  # the hello lists them; probed once per process
        # The reflex first: it hears every change before anything else does.
        self._unsubscribe.append(self.reflex.attach(self.vehicle))
        self._unsubscribe.append(self.vehicle.subscribe(self._on_vehicle))
        self._on_vehicle(self.vehicle.state())
        self._deliverer = asyncio.create_task(self._deliver(), name=f"outbox-{self.name}")
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
            providers=self.providers,
            capacity=self.capacity,
            held=self.held_assignments,
            on_message=self._on_command,
            on_welcome=self._on_welcome,
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
        for h in self.assignments.active():
            action = self.assignments.request_stop(Stop(uid=h.uid, grace_seconds=grace_seconds, reason="AgentShutdown"))
            self._apply_stop(h.uid, action, grace_seconds)
        running = [w.task for w in self._work.values() if w.task is not None and not w.task.done()]
        if running:
            await asyncio.wait(running, timeout=grace_seconds + 10.0)
        for w in self._work.values():
            if w.task is not None and not w.task.done():
                w.task.cancel()
        if self._policy_timer is not None:
            self._policy_timer.cancel()
        tasks = [t for t in (*self._tasks, self._deliverer) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await self.disconnect()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        self._set_work_meter()
        await self._save_energy()
        if self._own_session is not None:
            await self._own_session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        session = self._session or self._own_session
        assert session is not None, "start() the agent first"
        return session

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
        return sum(1 for h in self.assignments.held() if h.stage == "running")

    def assignment(self, uid: str) -> HeldAssignment | None:
        """What the car holds of ``uid`` (as its hello would say), or None once it was acked or never came."""
        return self.assignments.describe(uid)

    def run_pid(self, uid: str) -> int | None:
        """The pid of ``uid``'s runner while it runs (tests, diagnostics)."""
        w = self._work.get(uid)
        return w.run.pid if w is not None and w.run is not None else None

    def held_assignments(self) -> list[HeldAssignment]:
        """What the next hello lists (the link asks just before each hello)."""
        self.hellos += 1
        return self.assignments.hello()

    # ---- vehicle ----------------------------------------------------------------------------------------

    def _on_vehicle(self, state: VehicleState) -> None:
        """Vehicle observer: may run on the vehicle bus's thread; the rest is handed to the loop."""
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._vehicle_changed, state)
        else:
            self._vehicle_changed(state)

    def _vehicle_changed(self, state: VehicleState) -> None:
        self._state = state
        self._report_telemetry()
        if self.assignments.active():
            self._enforce_policy()

    def _telemetry(self) -> Telemetry | None:
        state = self._state
        if state is None:
            return None
        kwh, day = self.meter.today()
        return Telemetry(
            state_of_charge=min(max(state.state_of_charge, 0.0), 1.0),
            plugged_in=state.plugged_in,
            charging=state.charging,
            drive_state=state.drive_state,
            battery_temperature_c=min(max(state.battery_temperature_c, -60.0), 150.0),
            compute_temperature_c=min(max(state.compute_temperature_c, -60.0), 150.0),
            link_quality=min(max(state.link_quality, 0.0), 1.0),
            energy_today_kwh=min(kwh, 1000.0),
            energy_day=day,
            observed_at=state.observed_at,
        )

    def _report_telemetry(self) -> None:
        telemetry = self._telemetry()
        if telemetry is None:
            return
        self.last_telemetry = telemetry
        if self.link is not None:
            self.link.report_telemetry(telemetry)

    def _set_work_meter(self) -> None:
        """Tell the car the compute load now. Synchronous and cheap: the reflex callback calls it."""
        if self._work_meter is None:
            return
        load = min(1.0, self.meter.running * self.config.work_load) * self._work_scale
        try:
            self._work_meter(min(max(load, 0.0), 1.0))
        except Exception:
            log.exception("car %s: the work meter failed", self.name)

    # ---- the owner's rules ------------------------------------------------------------------------------

    def _evaluate_now(self) -> CarPolicy:
        now = datetime.fromtimestamp(self._clock(), UTC)
        # The car judges its own readings: the link being down, or trust (the operator's concern, enforced by a
        # taint the scheduler reads), never stop work that is safe to do.
        result = self._evaluate(self.policy, self._telemetry(), now=now, paused=self.paused, connected=True,
                                trusted=True, previous=self._car_policy)  # fmt: skip
        self._car_policy = result
        return result

    def _enforce_policy(self) -> None:
        """Drain running work if the owner's rules now say so; arm the one timer for the next change."""
        result = self._evaluate_now()
        reasons = result.must_drain()
        if reasons:
            detail = result.condition("Schedulable").message
            for h in self.assignments.active():
                action = self.assignments.drain(h.uid, reasons[0], detail, self.config.drain_grace_seconds)
                if action is not None:
                    log.info("car %s: draining %s (%s)", self.name, h.uid, ", ".join(reasons))
                    self._apply_stop(h.uid, action)
            self._kick()
        self._arm_policy_timer(result)

    def _arm_policy_timer(self, result: CarPolicy) -> None:
        """One timer per agent, while work is held: at the next instant the answer changes by time alone
        (``next_check_at``), or when today's energy reaches the owner's cap at the present draw."""
        if self._policy_timer is not None:
            self._policy_timer.cancel()
            self._policy_timer = None
        if self._loop is None or self._closed or not self.assignments.active():
            return
        delays: list[float] = []
        if result.next_check_at is not None:
            delays.append(result.next_check_at.timestamp() - self._clock())
        to_cap = self.meter.seconds_until_today_reaches(self.policy.max_energy_per_day_kwh)
        if to_cap:  # None: nothing draws power; 0: already reached, which the evaluation just judged
            delays.append(to_cap)
        if delays:
            # A hair late, never early: at the boundary itself the answer has changed.
            self._policy_timer = self._loop.call_later(max(0.0, min(delays)) + 0.05, self._on_policy_timer)

    def _on_policy_timer(self) -> None:
        self._policy_timer = None
        self._report_telemetry()
        if self.assignments.active():
            self._enforce_policy()

    def _on_policy(self, msg: OwnerPolicy) -> None:
        self.reflex.set_policy(msg.policy)
        self.meter.set_timezone(msg.policy.timezone)
        self.policy, self.paused, self.policy_generation = msg.policy, msg.paused, msg.generation
        log.info("car %s: owner's policy generation %d%s", self.name, msg.generation,
                 " (paused)" if msg.paused else "")  # fmt: skip
        self._report_telemetry()
        if self.assignments.active():
            self._enforce_policy()

    def _admit(self) -> None:
        """May new work start now? The reflex (the car's hard limits) and the owner's rules must both agree."""
        admission = self.reflex.admit()
        if not admission.allowed:
            first = admission.reasons[0]
            raise _Refused(
                ADMISSION_REASONS.get(first, "CarNotAvailable"),
                f"the car cannot take work now ({', '.join(admission.reasons)}); schedule it elsewhere",
            )
        result = self._evaluate_now()
        blocking = result.blocking()
        if blocking:
            raise _Refused(blocking[0], f"the owner's rules forbid new work now: "
                           f"{result.condition('Schedulable').message}")  # fmt: skip

    # ---- commands from the shim -------------------------------------------------------------------------

    async def _on_command(self, cmd: Command) -> None:
        # Runs inside the link's read loop: hand off at once, never await work here.
        if isinstance(cmd, Assign):
            self._on_assign(cmd)
        elif isinstance(cmd, Stop):
            self._on_stop(cmd)
        elif isinstance(cmd, Ack):
            self._on_ack(cmd)
        elif isinstance(cmd, OwnerPolicy):
            self._on_policy(cmd)
        else:
            log.warning("car %s: the shim refused a message (%s): %s", self.name, cmd.code, cmd.message)
        self._kick()

    def _on_assign(self, msg: Assign) -> None:
        if self._closed:
            return
        if not self.assignments.assign(msg):
            log.info("car %s: %s assigned again; it is already held (ignored)", self.name, msg.uid)
            return
        a = msg.assignment
        log.info("car %s: assigned %s/%s (uid %s, items %d..%d, cpu %s, memory %s, accelerator %d)", self.name,
                 msg.namespace, msg.name, msg.uid, a.input.start, a.input.end, a.resources.cpu,
                 a.resources.memory, a.resources.accelerator)  # fmt: skip
        w = _Work(msg.uid, self.work_dir / "runs" / msg.uid)
        self._work[msg.uid] = w
        w.task = asyncio.create_task(self._execute(w), name=f"shard-{self.name}-{msg.uid}")

    def _on_stop(self, msg: Stop) -> None:
        action = self.assignments.request_stop(msg)
        if action is StopAction.UNKNOWN:
            log.info("car %s: stop for %s, which it does not hold: answered UnknownAssignment", self.name, msg.uid)
        elif action is StopAction.RESEND:
            log.debug("car %s: stop for %s, already final: its status is sent again", self.name, msg.uid)
        else:
            log.info("car %s: stopping %s (%s, grace %.0f s)", self.name, msg.uid, msg.reason or "Stop",
                     msg.grace_seconds)  # fmt: skip
            self._apply_stop(msg.uid, action, msg.grace_seconds)

    def _on_ack(self, msg: Ack) -> None:
        result = self.assignments.ack(msg.uid)
        if result is AckResult.FORGOTTEN:
            self._sent.pop(msg.uid, None)
            self.meter.forget(msg.uid)
        elif result is AckResult.UNKNOWN:
            log.debug("car %s: ack for %s, which it no longer holds", self.name, msg.uid)

    def _apply_stop(self, uid: str, action: StopAction, grace: float | None = None) -> None:
        w = self._work.get(uid)
        h = self.assignments.get(uid)
        if w is None or h is None:
            return
        if grace is None:
            grace = h.stop.grace_seconds if h.stop is not None else 0.0
        if action is StopAction.CANCEL and w.fetch is not None:
            w.fetch.cancel()
        elif action is StopAction.STOP_RUN and w.run is not None:
            self._stop_run(w, grace)

    def _stop_run(self, w: _Work, grace: float) -> None:
        run = w.run
        if run is None:
            return
        if grace <= 0:
            run.kill_now()
            return
        if w.stopper is None or w.stopper.done():
            w.stopper = self._spawn(self._graceful_stop(run, grace))

    async def _graceful_stop(self, run: Run, grace: float) -> None:
        # The run's own stop waits its spec's grace; the pod's (or the owner's) grace rules here.
        stopping = asyncio.create_task(run.stop())
        done, _ = await asyncio.wait({stopping}, timeout=grace)
        if not done:
            run.kill_now()
        with contextlib.suppress(Exception):
            await stopping

    # ---- one assignment ---------------------------------------------------------------------------------

    async def _execute(self, w: _Work) -> None:
        uid = w.uid
        try:
            await self._run_assignment(w)
        except _Refused as r:
            self.assignments.refuse(uid, r.reason, r.message)
        except ArtifactFailure as f:
            h = self.assignments.get(uid)
            if h is not None and h.stop is not None:
                self.assignments.abandon(uid)
            else:
                self.assignments.refuse(uid, f.reason, f.message)
        except asyncio.CancelledError:
            if w.run is not None:
                w.run.kill_now()
            raise
        except Exception as e:
            log.exception("car %s: assignment %s failed inside the agent", self.name, uid)
            if w.run is not None:
                w.run.kill_now()
            self.assignments.fail(uid, "AgentError", f"the car agent failed: {type(e).__name__}: {e}"[:1000])
        finally:
            if w.unguard is not None:
                w.unguard()
                w.unguard = None
            self._stop_metering(w)
            self._cpus.give_back(w.cpus)
            w.cpus = ()
            self._work.pop(uid, None)
            self._kick()
            with contextlib.suppress(OSError):
                await asyncio.to_thread(shutil.rmtree, w.work_dir, True)
        h = self.assignments.get(uid)
        if h is not None and h.final:
            level = logging.INFO if h.phase == "Succeeded" else logging.WARNING
            log.log(level, "car %s: %s %s: %s: %s", self.name, uid, h.phase, h.reason, h.message)
            await self._log(w, f"ended: {h.reason}: {h.message}"[:4096])
        await self._save_energy()

    async def _run_assignment(self, w: _Work) -> None:
        uid, cfg = w.uid, self.config
        held = self.assignments.get(uid)
        assert held is not None and held.assign is not None
        a = held.assign.assignment
        self._admit()
        if a.model.runtime not in cfg.runtimes:
            raise _Refused("UnsupportedRuntime", f"this car does not offer the {a.model.runtime!r} runtime")
        if a.input.format not in ("npy", "npz"):
            raise _Refused("InputError", f"input format {a.input.format!r} is not npy or npz")
        res = a.resources
        provider = self.runner.provider_for(res.accelerator)
        if provider is None:
            raise _Refused("AcceleratorUnavailable",
                           accelerator_missing_message(res.accelerator, res.accelerator_type, self.providers))
        try:
            threads, memory = cpu_threads(res.cpu), memory_bytes(res.memory)
        except ValueError as e:
            raise _Refused("InvalidResources", str(e)) from None
        self.assignments.fetching(uid)
        self._kick()
        await self._log(w, f"assigned items {a.input.start}..{a.input.end} of sha256:{a.input.sha256} "
                           f"(cpu {res.cpu} -> {threads} thread(s), memory {res.memory}, provider {provider})")

        w.fetch = asyncio.create_task(self._fetch_all(w))
        try:
            model_path, input_path, resume_path = await w.fetch
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if (task is not None and task.cancelling()) or held.stop is None:
                raise
        if held.stop is not None:
            self.assignments.abandon(uid)
            return

        w.cpus = self._cpus.take(threads)
        spec = RunSpec(
            model_path=model_path,
            input_path=input_path,
            work_dir=w.work_dir / "sandbox",
            input_format="npz" if a.input.format == "npz" else "npy",
            model_sha256=a.model.sha256,
            input_sha256=a.input.sha256 if input_path.name == a.input.sha256 else None,
            batch_size=cfg.batch_size,
            threads=threads,  # from the pod spec only, so replicas agree byte for byte
            cpus=w.cpus,
            checkpoint_every_items=cfg.checkpoint_every_items,
            checkpoint_every_seconds=cfg.checkpoint_every_seconds,
            limits=Limits(memory_bytes=memory, wall_seconds=cfg.wall_seconds),
            allow_network_fallback=cfg.allow_network_fallback,
            accelerator=res.accelerator,
            accelerator_type=res.accelerator_type,
            resume_from=resume_path,
            shard=ShardRef(a.model.sha256, a.input.sha256, a.input.start, a.input.end),
        )
        run = self.runner.run(spec)
        w.run = run

        def on_trip() -> None:  # the safety path: SIGKILL first, then flags and the meter; nothing that waits
            run.kill_now()
            w.tripped = True
            self._stop_metering(w)

        # Guard first, then ask: if the reflex is already tripped the callback fires at once.
        w.unguard = self.reflex.add_stop_callback(on_trip)
        self._admit()
        try:
            await run.start()
        except OSError as e:
            raise _Refused("SandboxUnavailable", f"the sandbox could not start: {e}") from e
        if w.tripped:  # the reflex fired while the child was being created (kill_now had no process yet)
            run.kill_now()
        self.assignments.started(uid, provider)
        self.runs_started += 1
        if not w.tripped:
            self.meter.start(uid)
            self._set_work_meter()
            if w.tripped:  # a trip on the vehicle's thread in between: its own stop may have come first
                self._stop_metering(w)
        self._kick()
        await self._log(w, f"started the runner (pid {run.pid}, {threads} thread(s) on CPUs "
                           f"{','.join(map(str, w.cpus))}, memory limit {res.memory}, {provider})")
        if held.stop is not None:  # a stop or a drain came while it was starting
            self._stop_run(w, held.stop.grace_seconds)
        if self._car_policy is not None:
            self._arm_policy_timer(self._car_policy)

        async for ev in run.events():
            await self._on_progress(w, ev)
        result = await run.wait()
        self._stop_metering(w)
        await self._conclude(w, result)

    def _stop_metering(self, w: _Work) -> None:
        """Synchronous, cheap and idempotent: the reflex callback calls it, maybe from the vehicle's thread.
        Unconditional, so a trip racing the start of metering cannot leave an assignment metered."""
        self.meter.stop(w.uid)
        self._set_work_meter()

    def _trip_reason(self) -> tuple[str, str]:
        trip = self.reflex.last_trip
        triggers = trip.triggers if trip is not None else self.reflex.latched_triggers
        if StopTrigger.NOT_PARKED in triggers:
            reason = TRIP_REASONS[StopTrigger.NOT_PARKED]
        else:
            reason = next((TRIP_REASONS.get(t, "SafetyStop") for t in sorted(triggers)), "SafetyStop")
        state = trip.state if trip is not None else self._state
        where = f", drive state {state.drive_state}, charge {state.state_of_charge:.0%}" if state else ""
        return reason, f"{reason}{where}"

    async def _fetch_all(self, w: _Work) -> tuple[Path, Path, Path | None]:
        held = self.assignments.get(w.uid)
        assert held is not None and held.assign is not None
        a, grant = held.assign.assignment, held.assign.grant

        async def get(digest: str, what: str) -> Path:
            path = await self.artifacts.fetch(grant, digest, what)
            await self._log(w, f"fetched {what} sha256:{digest}")
            return path

        wanted = [get(a.model.sha256, "model"), get(a.input.sha256, "input")]
        if a.resume_from is not None:
            wanted.append(get(a.resume_from.sha256, "checkpoint"))
        paths = await asyncio.gather(*wanted)
        try:
            input_path = await asyncio.to_thread(slice_input, paths[1], a.input.format, a.input.start,
                                                 a.input.end, w.work_dir)  # fmt: skip
        except InputError as e:
            raise _Refused("InputError", str(e)) from None
        return paths[0], input_path, paths[2] if len(paths) > 2 else None

    async def _on_progress(self, w: _Work, ev: Progress) -> None:
        uid, now = w.uid, time.monotonic()
        if not w.loaded:
            w.loaded = True
            held = self.assignments.get(uid)
            if held is not None and held.assign is not None:
                await self._log(w, f"loaded model sha256:{held.assign.assignment.model.sha256}")
        self.assignments.progress(uid, ev.items_done)
        self.assignments.metered(uid, self.meter.assignment_kwh(uid))
        if ev.kind == "checkpoint" and ev.checkpoint_path is not None and not w.tripped:
            ck = await self._upload_checkpoint(w, ev.checkpoint_path)
            if ck is not None:
                self.assignments.checkpointed(uid, ck)
                await self._log(w, f"checkpoint at {ck.items_done}/{ev.items_total} items sha256:{ck.sha256}")
        elif ev.kind == "resumed":
            await self._log(w, f"resumed from the checkpoint at {ev.items_done}/{ev.items_total} items")
        if now - w.last_log_at >= self.config.log_interval_seconds:
            w.last_log_at = now
            await self._log(w, f"items {ev.items_done}/{ev.items_total}")
        self._report_telemetry()  # today's energy moves while work runs (sent past its deadband)
        self._kick()

    async def _conclude(self, w: _Work, result: RunResult) -> None:
        uid = w.uid
        if result.provider:
            self.assignments.ran_on(uid, result.provider)
        self.assignments.metered(uid, self.meter.assignment_kwh(uid))
        if w.tripped:
            self.assignments.trip(uid, *self._trip_reason())
        end = RunEnd(result.reason.value, result.message, result.exit_code, result.signal, result.items_done,
                     result.duration_seconds)  # fmt: skip
        if result.reason is Reason.COMPLETED and result.result_path is not None and result.result_sha256:
            await self._log(w, f"items {result.items_done}/{result.items_total}")
            try:
                data = await asyncio.to_thread(result.result_path.read_bytes)
                held = self.assignments.get(uid)
                assert held is not None and held.grant is not None
                await self.artifacts.upload(held.grant, result.result_sha256, data)
            except ArtifactFailure as f:
                self.assignments.fail(uid, f.reason, f.message, exit_code=0)
                return
            await self._log(w, f"result sha256:{result.result_sha256}")
            self.assignments.run_ended(uid, end, result.result_sha256)
            return
        if result.checkpoint_path is not None:
            ck = await self._upload_checkpoint(w, result.checkpoint_path)
            if ck is not None:
                self.assignments.checkpointed(uid, ck)
        self.assignments.run_ended(uid, end)

    # ---- artifacts --------------------------------------------------------------------------------------

    async def _upload_checkpoint(self, w: _Work, path: Path) -> ShardCheckpoint | None:
        held = self.assignments.get(w.uid)
        if held is None or held.grant is None:
            return None
        try:
            data, items_done = await asyncio.to_thread(read_checkpoint, path)
        except (OSError, ValueError, KeyError) as e:
            log.warning("car %s: checkpoint of %s unreadable (%s); keeping the previous one", self.name, w.uid, e)
            return None
        digest = hashlib.sha256(data).hexdigest()
        if held.checkpoint is not None and held.checkpoint.sha256 == digest:
            return held.checkpoint
        try:
            await self.artifacts.upload(held.grant, digest, data)
        except ArtifactFailure as f:
            log.warning("car %s: checkpoint of %s not uploaded: %s", self.name, w.uid, f.message)
            return None
        return ShardCheckpoint(sha256=digest, items_done=items_done)

    # ---- delivery: the outbox ---------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _on_welcome(self) -> None:
        """A new connection: everything held is due again (the shim may have lost it), oldest first."""
        self._sent.clear()
        self._retry_at = 0.0
        self._kick()

    async def _deliver(self) -> None:
        assert self._wake is not None
        while True:
            wait = self._next_due()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except Exception:  # delivery must outlive a bug in one report: the next wake tries again
                log.exception("car %s: sending statuses failed", self.name)

    def _next_due(self) -> float | None:
        """Seconds until a status falls due; None when nothing waits (or no link: the welcome kicks)."""
        if not self.connected:
            return None
        interval, now, due = self.config.status_interval_seconds, time.monotonic(), None
        if self._retry_at > now:
            return self._retry_at - now
        for h in self.assignments.held():
            sent = self._sent.get(h.uid)
            if sent is not None and sent[0] != h.version:
                left = max(0.0, sent[2] + interval - now)
                due = left if due is None else min(due, left)
        return due

    async def _flush(self) -> None:
        link = self.link
        if link is None or not link.connected.is_set():
            return  # everything is re-sent after the next welcome
        interval, now = self.config.status_interval_seconds, time.monotonic()
        if now < self._retry_at:
            return
        for h in reversed(self.assignments.held()):  # oldest first: reports arrive in the order work happened
            sent = self._sent.get(h.uid)
            if sent is not None and sent[0] == h.version:
                continue
            if sent is not None and sent[1] == h.milestone and now - sent[2] < interval:
                continue  # progress only: at most every status interval
            if not await link.send(self.assignments.status(h.uid)):
                # The link's queue is full or it just went down: try again shortly (or after the welcome).
                self._retry_at = now + _RETRY_SECONDS
                return
            self._sent[h.uid] = (h.version, h.milestone, now)

    async def _log(self, w: _Work, *lines: str) -> None:
        """Lines of the assignment's log, best effort (``offset`` shows the shim where lines went missing)."""
        link = self.link
        offset = w.log_offset
        w.log_offset += len(lines)
        if link is None:
            return
        with contextlib.suppress(ValueError):
            await link.send(protocol.Log(car=self.name, uid=w.uid, offset=offset, lines=[ln[:4096] for ln in lines]))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- energy across restarts -------------------------------------------------------------------------

    async def _load_energy(self) -> None:
        path = self.work_dir / _ENERGY_FILE
        try:
            saved = json.loads(await asyncio.to_thread(path.read_text))
        except (OSError, ValueError):
            return
        if isinstance(saved, dict):
            self.meter.restore(saved)

    async def _save_energy(self) -> None:
        # Kept so that a restarted agent does not hand the owner's daily cap a fresh day.
        path, body = self.work_dir / _ENERGY_FILE, json.dumps(self.meter.snapshot())

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(body)
            os.replace(tmp, path)

        with contextlib.suppress(OSError):
            await asyncio.to_thread(write)
