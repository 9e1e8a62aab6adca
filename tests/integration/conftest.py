"""The integration suite uses the session's real control plane from tests/conftest.py (``cluster``,
``crds_installed``); ``Cluster`` is re-exported here for the tests that name it. The digits model and its input
shards are shared by the modules that run real inference on a car (each module defines its own ``shim``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetlet.artifacts import BlobStore
from fleetlet.cli.local import ShimHandle
from fleetlet.models.digits import DigitsArtifacts, build_digits
from tests.conftest import Cluster

__all__ = ["Cluster"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsArtifacts:
    return build_digits(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def shards(shim: ShimHandle, digits: DigitsArtifacts, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model and two input shards in the module's shim's store: 300 items (a second or two) and the digits
    300 times over (~30 s of work at batch 1)."""
    store = BlobStore(shim.artifact_dir)
    inputs = np.load(digits.inputs_path)
    tmp = tmp_path_factory.mktemp("shards")
    short, long = tmp / "short.npy", tmp / "long.npy"
    np.save(short, inputs[:300])
    np.save(long, np.tile(inputs, (300, 1)))
    return {
        "model": store.put_file(digits.model_path),
        "short": store.put_file(short), "short_items": 300, "short_inputs": inputs[:300],
        "long": store.put_file(long), "long_items": 300 * len(inputs),
    }


def get_pod(cluster: Cluster, name: str, namespace: str = "default") -> dict[str, Any] | None:
    proc = cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def pod_phase(cluster: Cluster, name: str, namespace: str = "default") -> str | None:
    pod = get_pod(cluster, name, namespace)
    return pod.get("status", {}).get("phase") if pod else None


def dead_or_dying(pid: int, within_s: float = 0.1) -> bool:
    """Within the reflex target (100 ms): the process is gone, a zombie, or has SIGKILL pending."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        pending = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("ShdPnd:"))
        if pending & (1 << (9 - 1)):  # SIGKILL queued: the process cannot run another instruction of its own
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
