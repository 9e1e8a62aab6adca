"""Shared test data: minimal valid bodies users would write."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CRDS = ROOT / "crds"


def vehiclenode_body(name: str = "car-test-1") -> dict[str, Any]:
    return {
        "apiVersion": "fleetlet.io/v1alpha1",
        "kind": "VehicleNode",
        "metadata": {"name": name},
        "spec": {
            "vehicleId": name,
            "owner": {"id": "owner-1"},
            "region": "eu-west",
            "hardware": {"cpu": "4", "memory": "8Gi", "batteryCapacityKWh": 75, "computePowerW": 72},
        },
    }


def fleetjob_body(name: str = "job-test-1", namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "fleetlet.io/v1alpha1",
        "kind": "FleetJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": "fleetlet://artifacts/model.onnx", "sha256": "ab" * 32},
            "input": {"uri": "fleetlet://artifacts/input.npy", "items": 1000},
        },
    }


DELETE = object()
"""Pass as ``value`` to ``with_field`` to remove the field."""


def with_field(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``body`` with the dotted ``path`` set to ``value`` (or removed, for ``DELETE``)."""
    node = body
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(keys[-1])
    else:
        node[keys[-1]] = value
    return body


async def until(what: str, probe: Any, timeout_s: float, interval_s: float = 0.5) -> Any:
    """Poll the blocking ``probe`` (in a thread) until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(probe)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting until {what}")
        await asyncio.sleep(interval_s)
