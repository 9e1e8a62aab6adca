"""What the shim writes for a car's Node: registration body, status, taints, Lease. Pure functions, no I/O.

"Who writes what" (ARCHITECTURE.md): the shim owns the Node's status, its Lease, the labels that describe the car
(hardware, coarse region, pseudonymous owner) and those that follow telemetry, the car-state ``fleetlet.io/*``
taints and the cordon. ``spec.taints`` is an *atomic* list in the Node schema, so it cannot be shared through
server-side apply: ``merge_taints`` rebuilds the whole list from the freshest read, keeping every taint that is
not Fleetlet's own (the controller-manager's ``node.kubernetes.io/*``, taints users add), and the write carries
the resourceVersion it read so a concurrent writer is never overwritten.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fleetlet import __version__
from fleetlet.api.v1alpha1 import VehicleNode
from fleetlet.api.v1alpha1 import taints as t
from fleetlet.carlink.protocol import ACCELERATOR_PROVIDERS
from fleetlet.policy import CarPolicy

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
        # No kubernetes.io/os label: a car is not a Linux host for general pods. DaemonSets that tolerate every
        # taint select nodes by it (kube-proxy, CNI agents) and would otherwise get a pod on every car.
        "kubernetes.io/arch": arch,
        "type": "virtual-kubelet",
        t.LABEL_VEHICLE: "true",
        t.LABEL_ACCELERATOR: accel[0].type if accel else "none",
        t.LABEL_REGION: vn.spec.region,
        t.LABEL_OWNER: vn.spec.owner.id,
        t.LABEL_SHIM: shim_id,
    }


FLEETLET_TAINTS = frozenset(t.TAINT_EFFECTS)


def taint_body(key: str, effect: str, value: str | None, now: datetime) -> dict[str, Any]:
    body: dict[str, Any] = {"key": key, "effect": effect}
    if value is not None:
        body["value"] = value
    if effect == "NoExecute":
        body["timeAdded"] = now_rfc3339(now)  # tolerationSeconds count from here
    return body


def vehicle_taint() -> dict[str, Any]:
    return {"key": t.VEHICLE, "value": "true", "effect": t.TAINT_EFFECTS[t.VEHICLE]}


def merge_taints(current: list[dict[str, Any]], policy: CarPolicy | None, now: datetime) -> list[dict[str, Any]]:
    """The Node's whole taint list: every foreign taint as it is, the vehicle marker, and the car-state taints
    ``policy`` puts in force (a taint already present keeps its timeAdded, so tolerationSeconds do not restart)."""
    out = [dict(x) for x in current if x.get("key") not in FLEETLET_TAINTS]
    out.append(vehicle_taint())
    existing = {(x.get("key"), x.get("effect"), x.get("value")): x for x in current}
    for taint in policy.taints if policy is not None else ():
        kept = existing.get((taint.key, taint.effect, taint.value))
        out.append(dict(kept) if kept is not None else taint_body(taint.key, taint.effect, taint.value, now))
    return out


def same_taints(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    def keyed(xs: list[dict[str, Any]]) -> set[tuple[Any, Any, Any]]:
        return {(x.get("key"), x.get("effect"), x.get("value")) for x in xs}

    return len(a) == len(b) and keyed(a) == keyed(b)


def capacity(vn: VehicleNode, max_pods: int, providers: Sequence[str] = ACCELERATOR_PROVIDERS) -> dict[str, str]:
    """The Node's capacity. Accelerators are advertised only when the car's ONNX Runtime offers an accelerator
    provider (its hello lists ``providers``): a car with a GPU its runtime cannot use has none to offer."""
    hw = vn.spec.hardware
    cap = {"cpu": hw.cpu, "memory": hw.memory, "pods": str(max_pods), "ephemeral-storage": "16Gi"}
    accelerators = sum(a.count for a in hw.accelerators)
    if accelerators and any(p in ACCELERATOR_PROVIDERS for p in providers):
        cap[t.RESOURCE_ACCELERATOR] = str(accelerators)
    return cap


def ready_condition(ready: bool, reason: str, message: str, now: datetime,
                    previous: dict[str, Any] | None = None) -> dict[str, str]:
    """The Ready condition; its lastTransitionTime moves only when its status does (``previous``: the Node's
    current Ready condition), so ``kubectl describe node`` and the operator see when a car really came or went."""
    status = "True" if ready else "False"
    since = (previous or {}).get("lastTransitionTime") if (previous or {}).get("status") == status else None
    return {
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": now_rfc3339(now),
        "lastTransitionTime": since or now_rfc3339(now),
    }


def node_status(
    vn: VehicleNode, endpoint: Endpoint, max_pods: int, ready: bool, reason: str, message: str, now: datetime,
    providers: Sequence[str] = ACCELERATOR_PROVIDERS, previous_ready: dict[str, Any] | None = None,
) -> dict[str, Any]:
    name = vn.metadata.name or vn.spec.vehicle_id
    cap = capacity(vn, max_pods, providers)
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
        "conditions": [ready_condition(ready, reason, message, now, previous_ready), *pressure],
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


def node_manifest(
    vn: VehicleNode, labels: dict[str, str], status: dict[str, Any], policy: CarPolicy | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The body POSTed once to register the car: labels, taints (the vehicle marker and whatever car-state
    taints are already known, so a new car is never open to work its state forbids), cordon, status (kept on
    create, as the kubelet relies on), owned by the VehicleNode so deleting the car deletes its Node."""
    name = vn.metadata.name or vn.spec.vehicle_id
    now = now or datetime.now(UTC)
    if policy is not None:
        labels = {**labels, **policy.labels}
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if vn.metadata.uid:
        meta["ownerReferences"] = [
            {"apiVersion": vn.api_version, "kind": vn.kind, "name": name, "uid": vn.metadata.uid}
        ]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": meta,
        "spec": {"taints": merge_taints([], policy, now),
                 **({"unschedulable": True} if policy is not None and policy.cordoned else {})},
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
