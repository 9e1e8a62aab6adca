"""FleetJob: a batch inference job (namespaced) that Fleetlet shards across parked cars.

The user writes spec; the operator alone writes status and creates the shard pods.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from .meta import ApiModel, Conditions, DnsLabel, Fraction, ObjectMeta, Quantity, Sha256, cel

KIND = "FleetJob"
PLURAL = "fleetjobs"

# Runtimes a car may offer. `onnx` runs the model in Fleetlet's sandboxed ONNX Runtime process.
Runtime = Literal["onnx"]
# npy: one array, items along axis 0, fed to the model's single input; npz: named arrays (e.g. input_ids,
# attention_mask) sharing axis 0, fed to the inputs of the same names. Tokenizing happens before submission.
InputFormat = Literal["npy", "npz"]
Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
URI_PATTERN = r"^(fleetlet|s3|https?|file)://\S+$"


class ConditionType(StrEnum):
    ADMITTED = "Admitted"  # spec accepted, shards planned
    PROGRESSING = "Progressing"
    VERIFIED = "Verified"
    COMPLETE = "Complete"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class Reason(StrEnum):
    PLANNED = "ShardsPlanned"
    INVALID_SPEC = "InvalidSpec"
    WAITING_FOR_CARS = "WaitingForCars"
    RUNNING = "ShardsRunning"
    ALL_VERIFIED = "AllShardsVerified"
    QUORUM_PENDING = "QuorumPending"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    RETRIES_EXHAUSTED = "RetriesExhausted"
    BUDGET_EXCEEDED = "BudgetExceeded"
    SUSPENDED_BY_USER = "SuspendedByUser"
    SUCCEEDED = "Succeeded"


class ModelRef(ApiModel):
    uri: str = Field(min_length=1, max_length=2048, pattern=URI_PATTERN, description="Where the model is stored.")
    sha256: Sha256 = Field(description="Content digest; cars refuse a model whose bytes do not match.")
    runtime: Runtime = Field(default="onnx", description="How a car runs the model; 'onnx' is sandboxed.")


class InputRef(ApiModel):
    uri: str = Field(min_length=1, max_length=2048, pattern=URI_PATTERN)
    sha256: Sha256 | None = Field(default=None, description="Digest of the whole input, checked before sharding.")
    format: InputFormat = "npy"
    items: int = Field(ge=1, le=10_000_000_000, description="Number of items (rows) in the input.")


class Resources(ApiModel):
    cpu: Quantity = "1"
    memory: Quantity = "512Mi"
    accelerator: int = Field(default=0, ge=0, le=16, description="fleetlet.io/accelerator units per shard pod.")


class Placement(ApiModel):
    accelerator_types: list[DnsLabel] = Field(default_factory=list, max_length=16)
    min_state_of_charge: Fraction | None = Field(
        default=None, description="Extra floor on top of each owner's; cars below it are not used."
    )
    allow_unplugged: bool = Field(default=False, description="Tolerate fleetlet.io/unplugged (run on battery).")
    regions: list[DnsLabel] = Field(default_factory=list, max_length=32)


class Verification(ApiModel):
    model_config = ApiModel.model_config | ConfigDict(**{
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("self.quorum <= self.replicas", "quorum must not exceed replicas", ".quorum")
            ]
        }
    })

    replicas: int = Field(default=1, ge=1, le=5, description="Cars that run each shard independently.")
    quorum: int = Field(default=1, ge=1, le=5, description="Matching results needed to accept a shard.")
    spot_check_rate: Fraction = Field(
        default=0.0, description="Share of single-replica shards re-run on a second car to audit it."
    )
    tolerance: float = Field(
        default=1e-4, ge=0.0, le=1.0,
        description="Float outputs of two cars agree item by item within this relative and absolute tolerance "
        "(cars with different chips do not produce identical bytes); integer outputs must match exactly.",
    )

    @model_validator(mode="after")
    def _quorum_fits(self) -> Verification:
        if self.quorum > self.replicas:
            raise ValueError("quorum must not exceed replicas")
        return self


class Budget(ApiModel):
    max_energy_kwh: float | None = Field(default=None, gt=0.0, alias="maxEnergyKWh")
    max_cost: float | None = Field(default=None, gt=0.0)
    price_per_kwh: float = Field(default=0.35, ge=0.0, alias="pricePerKWh", description="Paid per kWh of car energy.")
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")


class Output(ApiModel):
    uri: str = Field(min_length=1, max_length=2048, pattern=URI_PATTERN)


class FleetJobSpec(ApiModel):
    model_config = ApiModel.model_config | ConfigDict(**{
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "!has(self.resources) || !has(self.resources.accelerator) || self.resources.accelerator == 0"
                    " || (has(self.placement) && has(self.placement.acceleratorTypes)"
                    " && size(self.placement.acceleratorTypes) > 0)",
                    "placement.acceleratorTypes must name at least one type when resources.accelerator > 0",
                    ".placement.acceleratorTypes",
                ),
                # A transition rule: checked on updates only. The shards, their ledger and the results already
                # accepted were planned from these fields; changing one under a running or finished job would
                # mix two jobs in one output. parallelism, suspend, retries, deadlineSeconds, budget and priority
                # may change at any time.
                cel(
                    "self.model == oldSelf.model && self.input == oldSelf.input"
                    " && self.shardSize == oldSelf.shardSize && self.resources == oldSelf.resources"
                    " && self.placement == oldSelf.placement && self.verification == oldSelf.verification"
                    " && has(self.output) == has(oldSelf.output)"
                    " && (!has(self.output) || self.output == oldSelf.output)",
                    "model, input, shardSize, resources, placement, verification and output cannot change once a"
                    " FleetJob exists (its shards were planned from them): create a FleetJob with a new name,"
                    " or delete this one first",
                ),
            ]
        }
    })

    model: ModelRef
    input: InputRef
    shard_size: int = Field(default=256, ge=1, le=1_000_000, description="Items per shard.")
    parallelism: int = Field(default=10, ge=1, le=100_000, description="Max shards in flight.")
    resources: Resources = Field(default_factory=Resources)
    placement: Placement = Field(default_factory=Placement)
    verification: Verification = Field(default_factory=Verification)
    retries: int = Field(default=3, ge=0, le=100, description="Re-runs of a shard after car failures.")
    deadline_seconds: int | None = Field(default=None, ge=1, le=30 * 24 * 3600)
    budget: Budget = Field(default_factory=Budget)
    output: Output | None = None
    suspend: bool = False
    priority: int = Field(default=0, ge=-1000, le=1000)

    @model_validator(mode="after")
    def _accelerator_needs_types(self) -> FleetJobSpec:
        if self.resources.accelerator > 0 and not self.placement.accelerator_types:
            raise ValueError(
                "placement.acceleratorTypes must name at least one type when resources.accelerator > 0"
            )
        return self


class ShardCounts(ApiModel):
    total: int = Field(default=0, ge=0)
    pending: int = Field(default=0, ge=0)
    running: int = Field(default=0, ge=0)
    succeeded: int = Field(default=0, ge=0)
    verified: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)


class Result(ApiModel):
    uri: str = Field(max_length=2048)
    sha256: Sha256


class FleetJobStatus(ApiModel):
    observed_generation: int | None = Field(default=None, ge=0)
    phase: Phase = "Pending"
    shards: ShardCounts = Field(default_factory=ShardCounts)
    items_done: int = Field(default=0, ge=0)
    items_total: int = Field(default=0, ge=0)
    conditions: Conditions
    energy_kwh: float = Field(default=0.0, ge=0.0, alias="energyKWh")
    cost: float = Field(default=0.0, ge=0.0)
    start_time: datetime | None = None
    completion_time: datetime | None = None
    result: Result | None = None


class FleetJob(ApiModel):
    KIND: ClassVar[str] = KIND
    PLURAL: ClassVar[str] = PLURAL
    SCOPE: ClassVar[str] = "Namespaced"

    api_version: Literal["fleetlet.io/v1alpha1"] = Field(default="fleetlet.io/v1alpha1")
    kind: Literal["FleetJob"] = Field(default="FleetJob")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FleetJobSpec
    status: FleetJobStatus | None = None

    @classmethod
    def from_kube(cls, body: dict[str, Any]) -> FleetJob:
        return cls.model_validate(body)


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Shards", "type": "integer", "jsonPath": ".status.shards.total"},
    {"name": "Running", "type": "integer", "jsonPath": ".status.shards.running"},
    {"name": "Verified", "type": "integer", "jsonPath": ".status.shards.verified"},
    {"name": "Items", "type": "integer", "jsonPath": ".spec.input.items"},
    {"name": "Done", "type": "integer", "jsonPath": ".status.itemsDone"},
    {"name": "kWh", "type": "number", "jsonPath": ".status.energyKWh", "priority": 1},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
SHORT_NAMES = ["fj", "fjob"]
