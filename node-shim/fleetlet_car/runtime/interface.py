"""The small contract between the car agent and whatever computes a shard: ``Runner`` makes ``Run``s.

What it is for: the agent starts work through ``Runner.run(spec)`` and drives the ``Run`` it gets (start, progress
events, graceful stop, synchronous kill, result) without knowing what is behind it. The default is
``SandboxRunner``: real ONNX Runtime in a sandboxed child (``SandboxedRun``). The simulator's SIMULATED compute
(``fleetlet_car.sim.compute``) implements the same contract for scale benchmarks.

Contract of a ``Run`` (the safety reflex depends on it):
- ``kill_now()`` is synchronous, cheap and idempotent; called before ``start()`` it is remembered and lands
  the moment the work exists, so work never runs unguarded.
- ``stop()`` asks for a graceful stop (a checkpoint, then the end) and may be called more than once.
- ``events()`` yields ``Progress`` until the run ends; ``wait()`` returns the ``RunResult`` and may be awaited
  by several tasks.

This module must never import ONNX Runtime or the simulator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from .providers import ProviderProbe, choose_provider, shared_probe
from .sandbox import Progress, RunResult, RunSpec, SandboxedRun


class Run(Protocol):
    @property
    def pid(self) -> int | None:
        """The process running the work, if there is one (for logs)."""
        ...

    async def start(self) -> None: ...

    def events(self) -> AsyncIterator[Progress]: ...

    async def wait(self) -> RunResult: ...

    async def stop(self, immediate: bool = False) -> None: ...

    def kill_now(self) -> None: ...


class Runner(Protocol):
    """What computes shards on this car."""

    async def providers(self) -> tuple[str, ...]:
        """The execution providers this runner offers (the hello lists them)."""
        ...

    def provider_for(self, accelerator: int) -> str | None:
        """The provider a shard asking for ``accelerator`` accelerators would run on; None if none can.

        Answers from what ``providers()`` found (call that first); never waits."""
        ...

    def run(self, spec: RunSpec) -> Run: ...


class SandboxRunner:
    """The real runner: ONNX Runtime in a sandboxed child per shard (see sandbox.py)."""

    def __init__(self, probe: ProviderProbe | None = None) -> None:
        self.probe = probe or shared_probe()

    async def providers(self) -> tuple[str, ...]:
        return await self.probe.providers()

    def provider_for(self, accelerator: int) -> str | None:
        return choose_provider(self.probe.known or (), accelerator)

    def run(self, spec: RunSpec) -> Run:
        return SandboxedRun(spec)
