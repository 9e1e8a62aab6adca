"""The values the planner reads and writes: views of shard pods and cars, the ledger's entries, the plan.

Plain frozen dataclasses, parsed once by the job controller from informer projections and ConfigMaps; the planner
never sees a raw API object.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fleetlet.api.v1alpha1.shard import ShardCheckpoint, ShardReport

# Pod labels and annotations the operator writes on shard pods.
LABEL_JOB = "fleetlet.io/job"  # the job's name (truncated to a label value)
LABEL_JOB_UID = "fleetlet.io/job-uid"  # what selects a job's pods: a re-created job never adopts old pods
LABEL_SHARD = "fleetlet.io/shard"
LABEL_REPLICA = "fleetlet.io/replica"
LABEL_ATTEMPT = "fleetlet.io/attempt"
ANNOTATION_CARRIED = "fleetlet.io/carried"  # what earlier attempts of this replica spent and where they ran


@dataclass(frozen=True, slots=True)
class Carried:
    """What earlier attempts of one replica left behind for the next: energy spent, departures, the cars that
    contributed (a resumed result is theirs too, for trust)."""

    energy_kwh: float = 0.0
    departures: int = 0
    cars: tuple[str, ...] = ()

    def annotation(self) -> str:
        return json.dumps({"e": round(self.energy_kwh, 9), "d": self.departures, "p": list(self.cars)},
                          separators=(",", ":"))

    @classmethod
    def parse(cls, raw: str | None) -> Carried:
        if not raw:
            return cls()
        try:
            body = json.loads(raw)
            return cls(float(body.get("e", 0.0)), int(body.get("d", 0)), tuple(str(c) for c in body.get("p", ())))
        except (ValueError, TypeError, AttributeError):
            return cls()

    def then(self, energy_kwh: float, car: str | None) -> Carried:
        """After one more attempt that ended in a departure on ``car``."""
        cars = self.cars + ((car,) if car and car not in self.cars else ())
        return Carried(self.energy_kwh + energy_kwh, self.departures + 1, cars)


@dataclass(frozen=True, slots=True)
class PodView:
    """One shard pod as the planner sees it."""

    name: str
    shard: int
    replica: int
    attempt: int
    phase: str  # Pending | Running | Succeeded | Failed | Gone (vanished without a final report)
    node: str  # the car it is bound to, "" before scheduling
    created_at: datetime
    reason: str | None = None  # the terminal reason (pod status reason)
    message: str | None = None
    report: ShardReport | None = None  # the car's latest words: items, checkpoint, result, energy
    resume: ShardCheckpoint | None = None  # where this attempt started from (its assignment)
    carried: Carried = field(default_factory=Carried)
    deleting: bool = False
    finished_at: datetime | None = None
    unschedulable: str | None = None  # the scheduler's message while it cannot place the pod

    @property
    def terminal(self) -> bool:
        return self.phase in ("Succeeded", "Failed", "Gone")

    @property
    def energy_kwh(self) -> float:
        return self.report.energy_kwh if self.report is not None else 0.0

    @property
    def checkpoint(self) -> ShardCheckpoint | None:
        """The newest point this attempt can be resumed from (its own checkpoint, else where it started)."""
        own = self.report.checkpoint if self.report is not None else None
        if own is not None and (self.resume is None or own.items_done >= self.resume.items_done):
            return own
        return self.resume


@dataclass(frozen=True, slots=True)
class CarView:
    """A car's record for verification (from its VehicleNode)."""

    owner: str
    valid_streak: int = 0
    untrusted: bool = False
    lost_since: datetime | None = None  # when its link went down (Connected=False), while it stays down


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a replica resumes after its pod is gone: durable in the ledger until the next attempt exists."""

    checkpoint: ShardCheckpoint | None
    carried: Carried
    next_attempt: int

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.next_attempt, "c": json.loads(self.carried.annotation())}
        if self.checkpoint is not None:
            out["k"] = [self.checkpoint.sha256, self.checkpoint.items_done]
        return out

    @classmethod
    def parse(cls, body: dict[str, Any]) -> ResumePoint:
        k = body.get("k")
        checkpoint = ShardCheckpoint(sha256=k[0], items_done=int(k[1])) if k else None
        return cls(checkpoint, Carried.parse(json.dumps(body.get("c") or {})), int(body.get("n", 0)))


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """What the ledger holds for one shard: its verdict once settled, or where its replicas resume."""

    accepted: str | None = None  # the accepted result's digest
    failed: str | None = None  # why the shard failed for good
    energy_kwh: float = 0.0  # all car energy the shard cost, once settled
    cars: tuple[str, ...] = ()  # the cars whose results were accepted
    resume: tuple[tuple[int, ResumePoint], ...] = ()  # (replica, where it resumes) while unsettled
    departures: int = 0  # once settled: how often its cars drove off (free) ...
    failures: int = 0  # ... and how often it failed itself (retries spent)
    attempts: int = 0  # once accepted: one past the highest pod attempt of any replica (a re-run starts there)
    reopened: int = 0  # how often an accepted result was withdrawn because its cars lost trust

    @property
    def settled(self) -> bool:
        return self.accepted is not None or self.failed is not None

    def resume_of(self, replica: int) -> ResumePoint | None:
        return next((p for r, p in self.resume if r == replica), None)

    def with_resume(self, replica: int, point: ResumePoint | None) -> LedgerEntry:
        rest = tuple((r, p) for r, p in self.resume if r != replica)
        resume = tuple(sorted(rest + ((replica, point),))) if point is not None else rest
        return dataclasses.replace(self, resume=resume)

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.accepted:
            out["a"] = self.accepted
        if self.failed:
            out["x"] = self.failed
        if self.energy_kwh:
            out["e"] = round(self.energy_kwh, 9)
        if self.cars:
            out["c"] = list(self.cars)
        if self.departures:
            out["d"] = self.departures
        if self.failures:
            out["f"] = self.failures
        if self.attempts:
            out["n"] = self.attempts
        if self.reopened:
            out["o"] = self.reopened
        if self.resume and not self.settled:
            out["r"] = {str(r): p.wire() for r, p in self.resume}
        return out

    @classmethod
    def parse(cls, body: dict[str, Any]) -> LedgerEntry:
        resume = tuple(sorted((int(r), ResumePoint.parse(p)) for r, p in (body.get("r") or {}).items()))
        return cls(body.get("a"), body.get("x"), float(body.get("e", 0.0)), tuple(body.get("c") or ()), resume,
                   int(body.get("d", 0)), int(body.get("f", 0)), int(body.get("n", 0)), int(body.get("o", 0)))


@dataclass(frozen=True, slots=True)
class PodCreate:
    shard: int
    replica: int
    attempt: int
    resume: ShardCheckpoint | None
    carried: Carried
    exclude_cars: tuple[str, ...] = ()  # cars (and owners) that already ran this shard: replicas must differ
    exclude_owners: tuple[str, ...] = ()
    cause: str = ""  # "" (first attempt), "departure" or "failure": why this attempt exists


@dataclass(frozen=True, slots=True)
class TrustVerdict:
    car: str
    valid: bool
    sole: bool  # the car alone produced the result (it did not resume from another car's checkpoint)
    shard: int


@dataclass(frozen=True, slots=True)
class JobEvent:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Counts:
    total: int = 0
    pending: int = 0  # not started, or waiting for a car
    running: int = 0
    succeeded: int = 0  # has at least one result, not yet accepted
    verified: int = 0  # accepted
    failed: int = 0
    items_done: int = 0
    energy_kwh: float = 0.0
    departures: int = 0
    failures: int = 0
    unschedulable: str | None = None  # the scheduler's most common complaint about waiting pods


@dataclass
class Plan:
    """What one reconcile of a job decided."""

    creates: list[PodCreate] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)  # pod names
    # Pods on cars lost for longer than ``lost_car_s``: deleted at once (grace 0), since no kubelet is left to
    # confirm a graceful deletion; the car, if it comes back, is told to stop them by its shim.
    force_deletes: list[str] = field(default_factory=list)
    ledger: dict[int, LedgerEntry] = field(default_factory=dict)  # shard -> new entry
    trust: list[TrustVerdict] = field(default_factory=list)
    events: list[JobEvent] = field(default_factory=list)
    compare: list[int] = field(default_factory=list)  # shards whose results must be classified first
    reopened: list[int] = field(default_factory=list)  # accepted shards withdrawn: their cars lost trust
    counts: Counts = field(default_factory=Counts)
    failed: tuple[str, str] | None = None  # (reason, message): the job fails
    complete: bool = False  # every shard accepted: merge the output
    requeue_after: float | None = None
    more: bool = False  # creations were capped: run again at once
