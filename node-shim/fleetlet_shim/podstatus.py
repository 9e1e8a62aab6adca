"""Pure translation between a car's reports and a pod's status, and the checks a car makes before it accepts
a pod (as the kubelet's admission does). No I/O.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from fleetlet.api.v1alpha1.shard import (
    PROGRESS_CONDITION,
    RUNTIME_CLASSES,
    RUNTIME_CONDITION,
    ShardAssignment,
    ShardReport,
)
from fleetlet.api.v1alpha1.taints import RESOURCE_ACCELERATOR
from fleetlet.carlink.protocol import PodStatus

_QTY = re.compile(r"^([0-9.]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_MULT = {
    None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a float (cores, bytes)."""
    m = _QTY.match(str(value))
    if not m:
        raise ValueError(f"not a quantity: {value!r}")
    return float(m.group(1)) * _MULT[m.group(2)]


def _ts(dt: datetime | None) -> str | None:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if dt else None


def now_ts() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Rejection(Exception):
    """The car cannot run this pod; ``reason`` becomes the pod's status reason (kubelet style)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def admit(pod: dict[str, Any], runtimes: list[str], capacity: dict[str, str],
          accelerator_type: str | None = None) -> ShardAssignment:
    """Check that the car can run ``pod``; return its assignment (``ShardAssignment.from_pod``, the one parser,
    with the car's accelerator type filled in when the pod asks for an accelerator) or raise ``Rejection``."""
    spec = pod.get("spec", {})
    rc = spec.get("runtimeClassName")
    runtime = RUNTIME_CLASSES.get(rc or "")
    if runtime is None:
        known = ", ".join(sorted(RUNTIME_CLASSES))
        raise Rejection(
            "UnsupportedRuntime",
            f"runtimeClassName {rc!r} cannot run on a car: cars run only sandboxed models ({known})",
        )
    if runtime not in runtimes:
        raise Rejection("UnsupportedRuntime", f"this car does not offer the {runtime!r} runtime")
    if len(spec.get("containers", [])) != 1:
        raise Rejection("InvalidAssignment", "a shard pod has exactly one container")
    try:
        assignment = ShardAssignment.from_pod(pod)
    except ValueError as exc:
        raise Rejection("InvalidAssignment", str(exc)) from None
    if assignment.model.runtime != runtime:
        raise Rejection("UnsupportedRuntime", f"the model needs {assignment.model.runtime!r}, the pod asks {rc!r}")
    wanted = assignment.resources
    for resource, amount in (("cpu", wanted.cpu), ("memory", wanted.memory)):
        if resource in capacity and quantity(amount) > quantity(capacity[resource]):
            raise Rejection(
                f"OutOf{resource}", f"the pod requests {resource} {amount}, the car has {capacity[resource]}"
            )
    if wanted.accelerator:
        have = int(capacity.get(RESOURCE_ACCELERATOR, "0"))
        if wanted.accelerator > have or accelerator_type is None:
            raise Rejection(
                "OutOfaccelerator",
                f"the pod requests {wanted.accelerator} {RESOURCE_ACCELERATOR}, the car has {have}",
            )
        wanted.accelerator_type = accelerator_type
    return assignment


def rejected_status(reason: str, message: str) -> dict[str, Any]:
    return {"phase": "Failed", "reason": reason, "message": f"Pod was rejected by the car: {message}"}


def container_name(pod: dict[str, Any]) -> str:
    containers = pod.get("spec", {}).get("containers") or [{}]
    return str(containers[0].get("name", "shard"))


def status_from_report(pod: dict[str, Any], msg: PodStatus, host_ip: str) -> dict[str, Any]:
    """The pod status the car's report implies (a strategic-merge patch body for pods/status)."""
    c = msg.container
    image = pod.get("spec", {}).get("containers", [{}])[0].get("image", "")
    state: dict[str, Any]
    if c.state == "running":
        state = {"running": {"startedAt": _ts(c.started_at) or now_ts()}}
    elif c.state == "terminated":
        term: dict[str, Any] = {
            "exitCode": c.exit_code if c.exit_code is not None else (0 if msg.phase == "Succeeded" else 1),
            "reason": c.reason or ("Completed" if msg.phase == "Succeeded" else "Error"),
            "startedAt": _ts(c.started_at),
            "finishedAt": _ts(c.finished_at) or now_ts(),
            "containerID": f"fleetlet://{msg.uid}",
        }
        # The kubelet puts a container's termination message here; a shard's is its result.
        term["message"] = _report(msg, with_message=True).termination_message()
        state = {"terminated": {k: v for k, v in term.items() if v is not None}}
    else:
        state = {"waiting": {"reason": c.reason or "ContainerCreating", **({"message": c.message} if c.message else {})}}
    running = c.state == "running"
    ts = now_ts()
    conditions = [
        {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": ts},
        {"type": "Initialized", "status": "True", "lastTransitionTime": ts},
        {"type": "ContainersReady", "status": "True" if running else "False", "lastTransitionTime": ts},
        {"type": "Ready", "status": "True" if running else "False", "lastTransitionTime": ts},
    ]
    conditions.append(
        {"type": PROGRESS_CONDITION, "status": "True", "reason": "Checkpointed" if msg.checkpoint else "Reported",
         "message": _report(msg, with_message=False).progress_message(), "lastTransitionTime": ts}
    )
    if msg.provider:
        conditions.append(
            {"type": RUNTIME_CONDITION, "status": "True", "reason": msg.provider,
             "message": f"the car's ONNX Runtime runs the shard on {msg.provider}", "lastTransitionTime": ts}
        )
    status: dict[str, Any] = {
        "phase": msg.phase,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "conditions": conditions,
        "containerStatuses": [
            {
                "name": container_name(pod),
                "state": state,
                "ready": running,
                "started": running,
                "restartCount": 0,
                "image": image,
                "imageID": image,
                "containerID": f"fleetlet://{msg.uid}",
            }
        ],
    }
    if c.started_at:
        status["startTime"] = _ts(c.started_at)
    elif not pod.get("status", {}).get("startTime"):
        status["startTime"] = ts
    if msg.phase in ("Succeeded", "Failed") and c.reason:
        status["reason"] = c.reason
        if c.message:
            status["message"] = c.message
    return status


def dispatched_status(pod: dict[str, Any], host_ip: str) -> dict[str, Any]:
    """Pending, container waiting in ``ContainerCreating`` (fetching the model and input), as a kubelet says."""
    image = pod.get("spec", {}).get("containers", [{}])[0].get("image", "")
    ts = now_ts()
    return {
        "phase": "Pending",
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": ts,
        "conditions": [{"type": "PodReadyToStartContainers", "status": "False", "lastTransitionTime": ts},
                       {"type": "Initialized", "status": "True", "lastTransitionTime": ts}],
        "containerStatuses": [{
            "name": container_name(pod), "ready": False, "started": False, "restartCount": 0,
            "image": image, "imageID": "",
            "state": {"waiting": {"reason": "ContainerCreating",
                                  "message": "the car is fetching the model and input by digest"}},
        }],
    }


def _report(msg: PodStatus, with_message: bool) -> ShardReport:
    return ShardReport(items_done=msg.items_done, checkpoint=msg.checkpoint, result_sha256=msg.result_digest,
                       provider=msg.provider, energy_kwh=msg.energy_kwh,
                       message=msg.container.message if with_message else None)


def latest_checkpoint(pod: dict[str, Any]) -> tuple[str, int] | None:
    """The newest checkpoint the pod's car reported (digest, items it covers), if any."""
    report = ShardReport.from_pod(pod)
    if report is None or report.checkpoint is None:
        return None
    return report.checkpoint.sha256, report.checkpoint.items_done


def is_terminal(pod: dict[str, Any]) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
