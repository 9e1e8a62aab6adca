"""The shard assignment a pod carries: the contract between whoever creates shard pods (the operator) and the
shim that runs them on a car. It rides in the pod annotation ``fleetlet.io/assignment`` as JSON.

Everything a car may fetch for the pod is named here by digest; the shim grants access to exactly these.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, model_validator

from .fleetjob import InputFormat, Runtime
from .meta import ApiModel, Sha256

ANNOTATION = "fleetlet.io/assignment"
LABEL_SHARD = "fleetlet.io/shard"  # on shard pods: "<job>-<index>"
LABEL_JOB = "fleetlet.io/job"
# RuntimeClass name -> the runtime a car offers.
RUNTIME_CLASSES: dict[str, str] = {"fleetlet-onnx": "onnx"}


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


class ShardCheckpoint(ApiModel):
    sha256: Sha256
    items_done: int = Field(ge=0)


class ShardAssignment(ApiModel):
    model: ShardModel
    input: ShardInput
    resume_from: ShardCheckpoint | None = None

    @classmethod
    def from_pod(cls, pod: dict[str, Any]) -> ShardAssignment:
        """Parse the pod's annotation; raises ValueError with a message fit for the pod's status."""
        raw = (pod.get("metadata", {}).get("annotations") or {}).get(ANNOTATION)
        if raw is None:
            raise ValueError(f"pod has no {ANNOTATION} annotation naming the model and input digests")
        try:
            return cls.model_validate(json.loads(raw))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"annotation {ANNOTATION} is invalid: {exc}") from None

    def annotation(self) -> str:
        return json.dumps(self.wire(), separators=(",", ":"))
