"""``fleetlet-sim``: a SIMULATED fleet of N cars, each a real ``CarAgent`` with its own certificate, in one process.

What it is for: demos, end-to-end tests and benchmarks of the control plane against many cars without cars.
Every simulated car runs the same agent code as a real car (link, safety reflex, owner's rules, energy meter,
sandboxed runtime); only the vehicle is simulated: a ``SimulatedFleet`` steps the battery, thermal,
driving-schedule and link physics of all cars together on one clock. One event loop serves every car: an idle
car costs a link (two small tasks and a TLS socket), a reflex and a row of numpy arrays; a sandbox child process
exists only while a shard runs. For scale benchmarks where thousands of cars cannot each run a real sandbox,
``--simulate-compute ITEMS_PER_S`` replaces the sandbox with SIMULATED compute (``sim.compute``): work that takes
time, checkpoints and yields deterministic results, without running a model.

``SimFleetHarness`` is the in-process API (tests), ``main`` the console script.

What it must never do: pretend to be a real car (ids are pseudonymous ``car-000123``), start a thread per car,
touch the Kubernetes API (the caller applies the VehicleNodes; ``--print-vehiclenodes`` prints them), or let
the simulated clock speed up sandboxed work or its energy bill (see ``--speedup``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import yaml

from fleetlet.api.v1alpha1.meta import ObjectMeta
from fleetlet.api.v1alpha1.vehiclenode import DriveState, VehicleNode, VehicleNodeSpec
from fleetlet.carlink.protocol import Capacity
from fleetlet.pki import CAR_ORGANIZATION, CertificateAuthority, KeyPair

from ..agent import AgentConfig, CarAgent
from ..link import car_ssl_context
from ..reflex import SafetyReflex
from ..runtime import Runner
from ..runtime.resources import CpuAllocator
from .compute import SimulatedCompute
from .fleet import SimulatedFleet, make_vehicle_specs
from .vehicle import SimulatedVehicle

log = logging.getLogger(__name__)



def capacity_of(spec: VehicleNodeSpec) -> Capacity:
    hw = spec.hardware
    return Capacity(cpu=hw.cpu, memory=hw.memory, accelerators=list(hw.accelerators))


def vehiclenodes_yaml(specs: Sequence[VehicleNodeSpec]) -> str:
    """VehicleNode manifests for ``kubectl apply -f -`` (name = vehicle id = the car's Node name)."""
    docs = [VehicleNode(metadata=ObjectMeta(name=s.vehicle_id), spec=s).wire() for s in specs]
    return yaml.safe_dump_all(docs, sort_keys=False)


@dataclass(frozen=True)
class FleetStats:
    cars: int
    connected: int
    running: int
    work_kwh: float  # work energy the simulated physics drew from the cars' batteries (diluted by speedup)
    sim_time_s: float
    agent_work_kwh: float = 0.0  # work energy the agents metered themselves (real time; what owners are paid for)


class SimFleetHarness:
    """N simulated cars with real agents on this event loop.

    ``async with SimFleetHarness(n, shim_url, ca_pem, issue_cert, work_dir, seed) as fleet:`` starts them (each
    dials ``shim_url`` with the certificate ``issue_cert(name)`` returns) and the physics clock; leaving the
    block stops them. ``fleet.agents[name]``, ``fleet.set_drive_state(name, state)``, ``fleet.disconnect(name)``,
    ``fleet.reconnect(name)``, ``fleet.stats()``.

    ``speedup`` multiplies the physics clock (schedules, charging, temperatures), never the sandboxed work: the
    compute load told to the physics is divided by ``speedup`` so metered work energy stays compute power × the
    real time the shard ran (its heat is diluted the same way).

    ``simulate_compute`` (items per second) replaces every car's sandbox with SIMULATED compute; the cars named
    in ``liars`` then produce wrong results (verification tests). Each agent meters its own work energy with
    its car's hardware spec (computePowerW, idlePowerW) and starts from its owner's policy.
    """

    def __init__(
        self,
        n: int,
        shim_url: str,
        ca_pem: bytes,
        issue_cert: Callable[[str], KeyPair],
        work_dir: str | Path,
        seed: int = 0,
        *,
        config: AgentConfig | None = None,
        specs: Sequence[VehicleNodeSpec] | None = None,
        schedules: bool = False,
        speedup: float = 1.0,
        tick_seconds: float = 1.0,
        connect: bool = True,
        simulate_compute: float | None = None,
        liars: Collection[str] = (),
        runner: Runner | None = None,
    ) -> None:
        if speedup <= 0 or tick_seconds <= 0:
            raise ValueError("speedup and tick_seconds must be positive")
        self.specs = list(specs) if specs is not None else make_vehicle_specs(n, seed)
        self.shim_url = shim_url
        self.ca_pem = ca_pem
        self.issue_cert = issue_cert
        self.work_dir = Path(work_dir)
        self.seed = seed
        self.config = config or AgentConfig()
        self.speedup = speedup
        self.tick_seconds = tick_seconds
        self.fleet = SimulatedFleet(self.specs, seed=seed, schedules=schedules)
        self.agents: dict[str, CarAgent] = {}
        self._connect = connect
        self.simulate_compute = simulate_compute
        self.liars = frozenset(liars)
        self._runner = runner
        self._session: aiohttp.ClientSession | None = None
        self._clock: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SimFleetHarness:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        certs = self.work_dir / "certs"
        ca_file = certs / "ca.crt"
        names = [s.vehicle_id for s in self.specs]

        def write_certs() -> None:
            certs.mkdir(parents=True, exist_ok=True)
            ca_file.write_bytes(self.ca_pem)
            for name in names:
                self.issue_cert(name).write(certs, name)

        await asyncio.to_thread(write_certs)
        store_ctx = ssl.create_default_context()
        store_ctx.load_verify_locations(cadata=self.ca_pem.decode())
        # One session for every car's link and artifact requests; no pool limit (each link holds a connection).
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=store_ctx))
        cpus = CpuAllocator(tuple(sorted(os.sched_getaffinity(0))))  # the cars share this machine's CPUs
        honest = liar = self._runner
        if self.simulate_compute is not None:
            honest = SimulatedCompute(self.simulate_compute)
            liar = SimulatedCompute(self.simulate_compute, lie=True)
        for i, spec in enumerate(self.specs):
            name = spec.vehicle_id
            ctx = car_ssl_context(ca_file, certs / f"{name}.crt", certs / f"{name}.key")
            vehicle = SimulatedVehicle(self.fleet.car(i))
            hw = spec.hardware
            agent = CarAgent(
                name,
                vehicle,
                SafetyReflex(spec.policy),
                shim_url=self.shim_url,
                ssl_context=ctx,
                capacity=capacity_of(spec),
                work_dir=self.work_dir / "cars" / name,
                cache_dir=self.work_dir / "cache",  # content-addressed and verified: safe to share
                config=replace(self.config, compute_power_w=hw.compute_power_w, idle_power_w=hw.idle_power_w),
                session=self._session,
                work_meter=vehicle.car.set_work,  # the physics meters the battery side of the work
                work_scale=1.0 / self.speedup,
                runner=liar if name in self.liars else honest,
                policy=spec.policy,
                paused=spec.paused,
                cpus=cpus,
            )
            self.agents[name] = agent
            await agent.start(connect=self._connect)
        self._clock = asyncio.create_task(self._tick(), name="sim-clock")
        log.info("simulated fleet of %d cars started (speedup %.0fx)", len(self.agents), self.speedup)

    async def stop(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._clock
            self._clock = None
        if self.agents:
            await asyncio.gather(*(a.close() for a in self.agents.values()), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.tick_seconds)
            now = loop.time()
            changes = self.fleet.step((now - last) * self.speedup)
            last = now
            for c in changes:
                log.debug("car %s: %s -> %s", c.vehicle_id, c.previous, c.current)

    # ---- control ------------------------------------------------------------------------------------------

    def index(self, name: str) -> int:
        return self.fleet.index_of(name)

    def set_drive_state(self, name: str, state: DriveState) -> None:
        """Force a car's drive state now; its reflex stops its work before this returns."""
        self.fleet.set_drive_state(self.index(name), state)

    def disconnect(self, name: str) -> Any:
        """Drop a car's link (await the result to wait for it to close)."""
        return self.agents[name].disconnect()

    def reconnect(self, name: str) -> None:
        self.agents[name].connect()

    def stats(self) -> FleetStats:
        agents = self.agents.values()
        return FleetStats(
            cars=len(self.agents),
            connected=sum(1 for a in agents if a.connected),
            running=sum(a.running for a in agents),
            work_kwh=float(self.fleet.work_energy_kwh.sum()),
            sim_time_s=self.fleet.now_s,
            agent_work_kwh=sum(a.meter.total_kwh() for a in agents),
        )


# ---- the console script ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleetlet-sim",
        description="Run N SIMULATED cars in one process, each a real fleetlet car agent (own certificate, "
        "safety reflex, sandboxed ONNX runtime) dialling the shim. Only the vehicles are simulated.",
        epilog="Apply the cars' VehicleNodes first: fleetlet-sim --print-vehiclenodes N --seed S | "
        "kubectl apply -f -",
    )
    p.add_argument("--cars", type=int, default=10, help="number of simulated cars (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seeds the car specs, physics and schedules")
    p.add_argument("--print-vehiclenodes", type=int, metavar="N",
                   help="print VehicleNode YAML for N cars of this seed and exit")
    p.add_argument("--shim-url", help="the shim's car link, e.g. wss://shim:8443/v1/link")
    p.add_argument("--ca", type=Path, help="the fleet CA certificate (PEM): trusted for the shim and the store")
    p.add_argument("--ca-key", type=Path,
                   help="the fleet CA's private key: issue each car a client certificate at start-up")
    p.add_argument("--cert-dir", type=Path,
                   help="or: a directory of pre-issued <car>.crt/<car>.key (CN = car name, O = fleetlet:cars)")
    p.add_argument("--work-dir", type=Path, default=Path("fleetlet-sim"), help="cars' work dirs and cache")
    p.add_argument("--speedup", type=float, default=1.0,
                   help="run the SIMULATED physics clock this many times faster than real time: driving "
                   "schedules, charging, battery and temperatures move faster. Sandboxed inference still runs "
                   "in real time, and its metered energy is kept to compute power x real run time (so its "
                   "heating effect is diluted by the same factor). Timeouts and leases stay real time.")
    p.add_argument("--tick", type=float, default=1.0, help="real seconds between physics steps (default 1)")
    p.add_argument("--no-schedules", action="store_true", help="cars stay parked unless told otherwise")
    p.add_argument("--status-every", type=float, default=5.0, help="seconds between status lines")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many real seconds (0 = run)")
    p.add_argument("--start-ready", action="store_true",
                   help="start every car parked, plugged in and at 90 %% charge (demos: work can start at once)")
    p.add_argument("--departures", type=int, default=0, metavar="N",
                   help="SIMULATED departures: N cars drive off in the middle of a shard (each once it has run "
                        "--departure-after seconds) and park again --departure-seconds later")
    p.add_argument("--departure-after", type=float, default=1.0)
    p.add_argument("--departure-seconds", type=float, default=20.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--checkpoint-seconds", type=float, default=30.0)
    p.add_argument("--allow-network-fallback", action="store_true",
                   help="run sandboxes even where unshare(CLONE_NEWNET) is refused (seccomp + audit hook)")
    p.add_argument("--simulate-compute", type=float, metavar="ITEMS_PER_S",
                   help="SIMULATED compute instead of real sandboxes (scale benchmarks): each shard takes "
                   "items/ITEMS_PER_S seconds, checkpoints, and yields a deterministic result that is NOT an "
                   "inference result; cars report the provider SimulatedCompute")
    p.add_argument("--lying-car", action="append", default=[], metavar="NAME",
                   help="with --simulate-compute: this car's results are wrong (verification tests); repeatable")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.print_vehiclenodes is not None:
        sys.stdout.write(vehiclenodes_yaml(make_vehicle_specs(args.print_vehiclenodes, args.seed)))
        return 0
    if not args.shim_url or not args.ca:
        _parser().error("--shim-url and --ca are required to run the fleet")
    if bool(args.ca_key) == bool(args.cert_dir):
        _parser().error("give exactly one of --ca-key (issue certificates) or --cert-dir (pre-issued)")
    ca_pem = args.ca.read_bytes()
    if args.ca_key:
        ca = CertificateAuthority(KeyPair(ca_pem, args.ca_key.read_bytes()))

        def issue(name: str) -> KeyPair:
            return ca.issue(name, organizations=(CAR_ORGANIZATION,), client=True)
    else:
        cert_dir: Path = args.cert_dir

        def issue(name: str) -> KeyPair:
            return KeyPair.read(cert_dir, name)

    config = AgentConfig(
        batch_size=args.batch_size,
        checkpoint_every_seconds=args.checkpoint_seconds,
        allow_network_fallback=args.allow_network_fallback,
    )
    harness = SimFleetHarness(
        args.cars, args.shim_url, ca_pem, issue, args.work_dir, args.seed, config=config,
        schedules=not args.no_schedules, speedup=args.speedup, tick_seconds=args.tick,
        simulate_compute=args.simulate_compute, liars=args.lying_car,
    )  # fmt: skip
    try:
        asyncio.run(_serve(harness, args.status_every, args.duration, ready=args.start_ready,
                           departures=(args.departures, args.departure_after, args.departure_seconds)))
    except KeyboardInterrupt:
        pass
    return 0


async def _depart(harness: SimFleetHarness, count: int, after_s: float, away_s: float) -> None:
    """SIMULATED departures for demos: ``count`` cars each drive off once they have worked ``after_s`` seconds
    on a shard (their safety reflex kills the sandbox at once), and park again ``away_s`` later."""
    working_since: dict[str, float] = {}
    gone: set[str] = set()
    loop = asyncio.get_running_loop()
    while len(gone) < count:
        await asyncio.sleep(0.2)
        now = loop.time()
        for name, agent in harness.agents.items():
            if name in gone:
                continue
            if not agent.running:
                working_since.pop(name, None)
                continue
            since = working_since.setdefault(name, now)
            if now - since >= after_s and len(gone) < count:
                gone.add(name)
                print(f"fleetlet-sim: car {name} drives off in the middle of a shard (SIMULATED departure); "
                      f"it parks again in {away_s:.0f} s", flush=True)
                harness.set_drive_state(name, "Driving")
                loop.call_later(away_s, harness.set_drive_state, name, "Parked")


async def _serve(harness: SimFleetHarness, status_every: float, duration: float, *, ready: bool = False,
                 departures: tuple[int, float, float] = (0, 1.0, 20.0)) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    async with harness:
        if ready:
            for i in range(len(harness.agents)):
                harness.fleet.set_state_of_charge(i, 0.9)
                harness.fleet.set_plugged_in(i, True)
                harness.fleet.set_drive_state(i, "Parked")
        departer = asyncio.create_task(_depart(harness, *departures)) if departures[0] else None
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(status_every):
                    await stop.wait()
            s = harness.stats()
            print(
                f"fleetlet-sim: {s.connected}/{s.cars} cars connected, {s.running} shards running, "
                f"{s.agent_work_kwh:.3f} kWh of work metered by the cars ({s.work_kwh:.3f} kWh drawn in the "
                f"physics), sim clock +{s.sim_time_s / 3600:.2f} h",
                flush=True,
            )
            if duration and time.monotonic() - started >= duration:
                break
        if departer is not None:
            departer.cancel()


if __name__ == "__main__":
    sys.exit(main())
