"""Shared test data: minimal valid bodies users would write."""

from __future__ import annotations

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
