"""``fleetlet-car``: run one car agent (``python -m fleetlet_car`` does the same).

What it is for: one car, one process: its certificate, its link to the shim, its safety reflex and sandboxed
runtime. This build has no adapter for a real vehicle bus, so the vehicle must be ``--simulated`` (a standalone
SIMULATED car); a real car's adapter implements ``fleetlet_car.vehicle.VehicleInterface``.

What it must never do: run work without a vehicle to guard it (no ``--simulated`` and no real adapter: it
refuses to start), or print a grant or a key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from .agent import AgentConfig, CarAgent
from .link import car_ssl_context
from .reflex import SafetyReflex
from .sim.fleet import SimulatedCar, make_vehicle_specs
from .sim.runner import capacity_of
from .sim.vehicle import SimulatedVehicle

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleetlet-car",
        description="Run one Fleetlet car agent. There is no real vehicle-bus adapter in this build: pass "
        "--simulated to drive the agent with a SIMULATED car (physics only; the agent, link, safety reflex and "
        "sandboxed runtime are the real ones).",
    )
    p.add_argument("--name", required=True, help="the car's Node name (must equal its certificate's CN)")
    p.add_argument("--shim-url", required=True, help="the shim's car link, e.g. wss://shim:8443/v1/link")
    p.add_argument("--cert", type=Path, required=True, help="the car's client certificate (PEM)")
    p.add_argument("--key", type=Path, required=True, help="the car's private key (PEM)")
    p.add_argument("--ca", type=Path, required=True, help="the fleet CA certificate (PEM)")
    p.add_argument("--work-dir", type=Path, default=Path("fleetlet-car"), help="run dirs and artifact cache")
    p.add_argument("--simulated", action="store_true",
                   help="use a standalone SIMULATED car (required: no real vehicle bus adapter in this build)")
    p.add_argument("--seed", type=int, default=0, help="seeds the simulated car's hardware and policy")
    p.add_argument("--schedules", action="store_true", help="let the simulated car drive on a daily schedule")
    p.add_argument("--tick", type=float, default=1.0, help="real seconds between simulated physics steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--checkpoint-seconds", type=float, default=30.0)
    p.add_argument("--allow-network-fallback", action="store_true",
                   help="run sandboxes even where unshare(CLONE_NEWNET) is refused (seccomp + audit hook)")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.simulated:
        _parser().error("no real vehicle bus adapter in this build: pass --simulated")
    spec = make_vehicle_specs(1, args.seed)[0].model_copy(update={"vehicle_id": args.name})
    car = SimulatedCar.standalone(spec, seed=args.seed, schedules=args.schedules)
    config = AgentConfig(
        batch_size=args.batch_size,
        checkpoint_every_seconds=args.checkpoint_seconds,
        allow_network_fallback=args.allow_network_fallback,
        compute_power_w=spec.hardware.compute_power_w,
        idle_power_w=spec.hardware.idle_power_w,
    )
    agent = CarAgent(
        args.name,
        SimulatedVehicle(car),
        SafetyReflex(spec.policy),
        shim_url=args.shim_url,
        ssl_context=car_ssl_context(args.ca, args.cert, args.key),
        capacity=capacity_of(spec),
        work_dir=args.work_dir,
        config=config,
        work_meter=car.set_work,  # the simulated battery feels the work
        policy=spec.policy,  # until the shim sends the owner's current rules
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(agent, car, args.tick))
    return 0


async def _serve(agent: CarAgent, car: SimulatedCar, tick: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await agent.start()
    log.info("car %s: agent started (simulated vehicle)", agent.name)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await stop.wait()
            car.step(tick)
    finally:
        await agent.close(grace_seconds=5.0)


if __name__ == "__main__":
    sys.exit(main())
