"""What the shim writes for a car's Node: registration body, status, Lease. Pure functions, no I/O.

"Who writes what" (ARCHITECTURE.md): the shim owns the Node's status, its Lease and the labels that describe the
car's hardware and coarse place. ``spec.taints`` is an *atomic* list in the Node schema, so two field managers
cannot share it: the shim sets ``fleetlet.io/vehicle:NoSchedule`` once, at creation (as the kubelet's
``--register-with-taints`` does), and never applies taints again; the operator owns the list afterwards and always
keeps that taint in it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fleetlet import __version__
from fleetlet.api.v1alpha1 import VehicleNode
from fleetlet.api.v1alpha1 import taints as t

KUBELET_VERSION = f"v1.37.2-fleetlet-{__version__}"
RUNTIME_VERSION = "fleetlet-onnx://1.0"
NODE_LEASE_NAMESPACE = "kube-node-lease"


@dataclass(frozen=True)
class Endpoint:
    """Where the API server reaches this shim's kubelet API (logs): the Node's InternalIP and port."""

    address: str
    port: int


def now_rfc3339(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def hardware_labels(vn: VehicleNode, shim_id: str, arch: str = "arm64") -> dict[str, str]:
    accel = vn.spec.hardware.accelerators
    return {
        "kubernetes.io/hostname": vn.metadata.name or vn.spec.vehicle_id,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": arch,
        "type": "virtual-kubelet",
        t.LABEL_VEHICLE: "true",
        t.LABEL_ACCELERATOR: accel[0].type if accel else "none",
        t.LABEL_REGION: vn.spec.region,
        t.LABEL_SHIM: shim_id,
    }


def capacity(vn: VehicleNode, max_pods: int) -> dict[str, str]:
    hw = vn.spec.hardware
    cap = {"cpu": hw.cpu, "memory": hw.memory, "pods": str(max_pods), "ephemeral-storage": "16Gi"}
    accelerators = sum(a.count for a in hw.accelerators)
    if accelerators:
        cap[t.RESOURCE_ACCELERATOR] = str(accelerators)
    return cap


def ready_condition(ready: bool, reason: str, message: str, now: datetime) -> dict[str, str]:
    return {
        "type": "Ready",
        "status": "True" if ready else "False",
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": now_rfc3339(now),
        "lastTransitionTime": now_rfc3339(now),
    }


def node_status(
    vn: VehicleNode, endpoint: Endpoint, max_pods: int, ready: bool, reason: str, message: str, now: datetime
) -> dict[str, Any]:
    name = vn.metadata.name or vn.spec.vehicle_id
    cap = capacity(vn, max_pods)
    ts = now_rfc3339(now)
    pressure = [
        {"type": kind, "status": "False", "reason": f"No{kind}", "message": "", "lastHeartbeatTime": ts,
         "lastTransitionTime": ts}
        for kind in ("MemoryPressure", "DiskPressure", "PIDPressure")
    ]
    uid = re.sub(r"[^a-z0-9-]", "-", name)
    return {
        "capacity": cap,
        "allocatable": cap,
        "conditions": [ready_condition(ready, reason, message, now), *pressure],
        "addresses": [
            {"type": "InternalIP", "address": endpoint.address},
            {"type": "Hostname", "address": name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": endpoint.port}},
        "nodeInfo": {
            "machineID": uid,
            "systemUUID": uid,
            "bootID": "",
            "kernelVersion": "",
            "osImage": f"Fleetlet car agent (shim {__version__})",
            "containerRuntimeVersion": RUNTIME_VERSION,
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": "arm64",
        },
    }


def node_manifest(vn: VehicleNode, labels: dict[str, str], status: dict[str, Any]) -> dict[str, Any]:
    """The body POSTed once to register the car: labels, the vehicle taint, status (kept on create, as the
    kubelet relies on), owned by the VehicleNode so deleting the car deletes its Node."""
    name = vn.metadata.name or vn.spec.vehicle_id
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if vn.metadata.uid:
        meta["ownerReferences"] = [
            {"apiVersion": vn.api_version, "kind": vn.kind, "name": name, "uid": vn.metadata.uid}
        ]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": meta,
        "spec": {"taints": [{"key": t.VEHICLE, "value": "true", "effect": t.TAINT_EFFECTS[t.VEHICLE]}]},
        "status": status,
    }


def node_status_apply(name: str, status: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "status": status}


def lease_manifest(name: str, node_uid: str | None, duration_s: int, now: datetime) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NODE_LEASE_NAMESPACE}
    if node_uid:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {"holderIdentity": name, "leaseDurationSeconds": duration_s, "renewTime": micro_time(now)},
    }
