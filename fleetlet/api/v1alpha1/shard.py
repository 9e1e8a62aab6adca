"""The shard assignment: the one contract for a piece of work, from the operator through the pod and the shim to
the car.

The operator builds a ``ShardAssignment`` and writes it onto a shard pod with ``apply_to_pod`` (what the car may
fetch goes into the ``fleetlet.io/assignment`` annotation as JSON; the resources become the container's requests
and limits, so the kube-scheduler places the pod by exactly what the car will enforce). The shim reads it back
with ``ShardAssignment.from_pod`` (the only parser) and sends it to the car unchanged inside the link's
``assign`` message; the car runs exactly it: its model and input by digest, its resources as the sandbox's
limits, its accelerator on the matching execution provider.

Everything a car may fetch for the pod is named here by digest; the shim grants access to exactly these.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, model_validator

from .fleetjob import InputFormat, Runtime
from .meta import ApiModel, DnsLabel, Quantity, Sha256
from .taints import RESOURCE_ACCELERATOR

ANNOTATION = "fleetlet.io/assignment"
PROGRESS_CONDITION = "fleetlet.io/Progress"  # pod condition: the car's latest progress and checkpoint
RUNTIME_CONDITION = "fleetlet.io/Runtime"  # pod condition: the execution provider that runs the shard
LABEL_SHARD = "fleetlet.io/shard"  # on shard pods: "<job>-<index>"
LABEL_JOB = "fleetlet.io/job"
# RuntimeClass name -> the runtime a car offers.
RUNTIME_CLASSES: dict[str, str] = {"fleetlet-onnx": "onnx"}
DEFAULT_CPU = "1"
DEFAULT_MEMORY = "512Mi"


class ShardModel(ApiModel):
    sha256: Sha256
    runtime: Runtime = "onnx"


class ShardInput(ApiModel):
    """Items ``[start, end)`` of the artifact ``sha256`` (the shard's own artifact: start 0, end = its items)."""

    sha256: Sha256
    format: InputFormat = "npy"
    start: int = Field(default=0, ge=0)
    end: int = Field(ge=1)

    @model_validator(mode="after")
    def _range(self) -> ShardInput:
        if self.end <= self.start:
            raise ValueError("end must be above start")
        return self

    @property
    def items(self) -> int:
        return self.end - self.start


class ShardCheckpoint(ApiModel):
    """A saved state of a shard in the artifact store: work resumes from it, on this car or another."""

    sha256: Sha256
    items_done: int = Field(ge=0)


class ShardResources(ApiModel):
    """What the shard may use on the car: the pod's requests, enforced as the sandbox's limits.

    ``accelerator`` counts ``fleetlet.io/accelerator`` units; ``accelerator_type`` is the type the car must run
    it on (the Node label ``fleetlet.io/accelerator``), filled in by the shim from the car the pod landed on.
    """

    cpu: Quantity = DEFAULT_CPU
    memory: Quantity = DEFAULT_MEMORY
    accelerator: int = Field(default=0, ge=0, le=16)
    accelerator_type: DnsLabel | None = None


class ShardAssignment(ApiModel):
    model: ShardModel
    input: ShardInput
    resume_from: ShardCheckpoint | None = None
    resources: ShardResources = Field(default_factory=ShardResources)

    @classmethod
    def from_pod(cls, pod: dict[str, Any]) -> ShardAssignment:
        """The assignment a shard pod carries; raises ValueError with a message fit for the pod's status.

        The annotation names what the car fetches; the resources are read from the pod's single container
        (limits where set, else requests), because those are what the scheduler placed the pod by.
        """
        raw = (pod.get("metadata", {}).get("annotations") or {}).get(ANNOTATION)
        if raw is None:
            raise ValueError(f"pod has no {ANNOTATION} annotation naming the model and input digests")
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise TypeError("the annotation must be a JSON object")
            body.pop("resources", None)  # the pod's own resources are the truth, not a copy in the annotation
            assignment = cls.model_validate(body)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"annotation {ANNOTATION} is invalid: {exc}") from None
        containers = pod.get("spec", {}).get("containers") or [{}]
        resources = containers[0].get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}

        def pick(name: str, default: str) -> str:
            return str(limits.get(name) or requests.get(name) or default)

        try:
            assignment.resources = ShardResources(
                cpu=pick("cpu", DEFAULT_CPU),
                memory=pick("memory", DEFAULT_MEMORY),
                accelerator=int(pick(RESOURCE_ACCELERATOR, "0")),
            )
        except ValueError as exc:
            raise ValueError(f"the pod's resources cannot run on a car: {exc}") from None
        return assignment

    def annotation(self) -> str:
        """The annotation's JSON: what the car fetches (the resources live in the pod spec)."""
        return json.dumps(self.wire(exclude={"resources"}), separators=(",", ":"))

    def apply_to_pod(self, pod: dict[str, Any]) -> dict[str, Any]:
        """Write this assignment onto ``pod`` (annotation + the single container's requests and limits);
        returns ``pod``. ``from_pod`` reads back exactly this assignment."""
        meta = pod.setdefault("metadata", {})
        meta.setdefault("annotations", {})[ANNOTATION] = self.annotation()
        containers = pod.setdefault("spec", {}).setdefault("containers", [{"name": "shard"}])
        amounts: dict[str, str] = {"cpu": self.resources.cpu, "memory": self.resources.memory}
        if self.resources.accelerator:
            amounts[RESOURCE_ACCELERATOR] = str(self.resources.accelerator)
        # requests == limits: the scheduler reserves what the sandbox enforces (Guaranteed QoS, as on a kubelet).
        containers[0]["resources"] = {"requests": dict(amounts), "limits": dict(amounts)}
        return pod


class ShardReport(ApiModel):
    """What a car reported about a shard, as the shim writes it on the pod and the operator reads it back.

    While the shard runs it is the ``fleetlet.io/Progress`` condition's message (``key=value`` words a person can
    read too); when it ends it is the JSON of the terminated container's message (the kubelet's
    termination-message slot: a shard's "last words" are its result).
    """

    items_done: int = Field(default=0, ge=0)
    checkpoint: ShardCheckpoint | None = None
    result_sha256: Sha256 | None = None
    provider: str | None = Field(default=None, max_length=64)
    energy_kwh: float = Field(default=0.0, ge=0.0, alias="energyKWh")
    message: str | None = Field(default=None, max_length=1024)

    def termination_message(self) -> str:
        return json.dumps(self.wire(), separators=(",", ":"))

    def progress_message(self) -> str:
        words = [f"itemsDone={self.items_done}"]
        if self.checkpoint is not None:
            words.append(f"checkpoint=sha256:{self.checkpoint.sha256} checkpointItems={self.checkpoint.items_done}")
        if self.provider:
            words.append(f"provider={self.provider}")
        if self.energy_kwh:
            words.append(f"energyKWh={self.energy_kwh:.6f}")
        return " ".join(words)

    @classmethod
    def from_progress_message(cls, message: str) -> ShardReport:
        fields = dict(w.split("=", 1) for w in message.split() if "=" in w)
        checkpoint = None
        if fields.get("checkpoint", "").startswith("sha256:") and "checkpointItems" in fields:
            checkpoint = ShardCheckpoint(sha256=fields["checkpoint"][7:], items_done=int(fields["checkpointItems"]))
        return cls(items_done=int(fields.get("itemsDone", 0)), checkpoint=checkpoint,
                   provider=fields.get("provider"), energy_kwh=float(fields.get("energyKWh", 0.0)))

    @classmethod
    def from_pod(cls, pod: dict[str, Any]) -> ShardReport | None:
        """The latest report on ``pod``: its final words if the container terminated, else its progress."""
        status = pod.get("status") or {}
        for cs in status.get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if term and term.get("message"):
                try:
                    return cls.model_validate(json.loads(term["message"]))
                except (ValueError, TypeError):
                    break
        for cond in status.get("conditions") or []:
            if cond.get("type") == PROGRESS_CONDITION:
                try:
                    return cls.from_progress_message(cond.get("message", ""))
                except (ValueError, TypeError):
                    return None
        return None
