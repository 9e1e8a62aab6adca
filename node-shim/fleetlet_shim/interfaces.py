"""The small typed interfaces that join the shim's parts (virtual-kubelet's seams, in Python).

- ``CarChannel``: how controllers talk to a connected car (implemented by ``link.LinkServer``).
- ``CarEvents``: what the car registry tells its listeners when a car connects, reports or goes away (the
  shim's composition root subscribes one that enqueues keys in the controllers).

Contracts: every method is quick and never blocks on a car or the API server. ``CarChannel.send`` may be called
for a car that just went away (it returns False) and for the same message twice (the car ignores a duplicate
``assign`` of a held assignment and a second ``stop``), so a controller retries a send freely.
"""

from __future__ import annotations

from typing import Protocol

from fleetlet.carlink.protocol import PodStatus, ShimMessage


class CarChannel(Protocol):
    def send(self, car: str, msg: ShimMessage) -> bool:
        """Queue ``msg`` for ``car``; False if the car is not connected or its queue is full. Never blocks."""
        ...

    def is_connected(self, car: str) -> bool: ...


class CarEvents(Protocol):
    def car_changed(self, car: str) -> None:
        """The car connected, went away, or its VehicleNode changed: its Node, Lease and state need a look."""
        ...

    def car_telemetry(self, car: str, urgent: bool) -> None:
        """New telemetry arrived; ``urgent`` when a safety-relevant field changed (drive state, plug)."""
        ...

    def car_pods(self, car: str) -> None:
        """Every pod on the car needs a look (after a connect: dispatch what it lacks, stop what it should not run)."""
        ...

    def pod_report(self, car: str, report: PodStatus) -> None:
        """The car reported on one of its assignments."""
        ...
