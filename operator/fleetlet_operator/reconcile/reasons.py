"""Why a shard pod ended, sorted into what costs the job nothing and what counts against its retries.

A car that leaves is the common case, not an error (OPERATOR.md: none of the batch schedulers treat "the node
left" as free). Every way a car can stop being available — it drove off, its battery or temperature crossed a
limit, its owner's window closed or the owner paused it, it was drained, evicted or lost — is a *departure*: the
shard resumes from its last checkpoint on another car and its retry budget is untouched. A *failure* is the
shard's own fault (the model crashed, the input is malformed, it ran out of memory, a digest did not match): it
counts against ``retries``. A reason nobody listed is treated as a failure, so an unknown crash can never loop
forever for free.
"""

from __future__ import annotations

from enum import StrEnum

GONE = "PodGone"  # the pod vanished without a final report (evicted, its Node deleted, or deleted by a person)


class Outcome(StrEnum):
    DEPARTURE = "Departure"
    FAILURE = "Failure"


# Pod status reasons the car agent, the shim and Kubernetes give when a car stops being available.
DEPARTURES = frozenset({
    GONE,
    # the car's safety reflex (fleetlet_car.agent)
    "CarLeftParked", "BatteryCritical", "BatteryOverheat", "ComputeOverheat", "CarUnplugged", "SafetyStop",
    # the car refused new work as its state changed between scheduling and dispatch
    "CarNotParked", "BatteryLow", "BatteryTooWarm", "ComputeTooWarm", "NoVehicleState", "CarNotAvailable",
    # the owner's rules drained it (fleetlet.policy reasons)
    "OutsideAvailabilityWindow", "PausedByOwner", "DailyEnergyCapReached", "ChargeBelowFloor",
    "TemperatureAboveSoftLimit", "Unplugged", "ResultsFailedVerification",
    # stopped on request: deletion, drain, eviction, suspend, the agent shutting down
    "Stopped", "AgentShutdown", "PodDeleted", "PodNotFound", "Evicted", "Preempted", "NodeLost", "Terminated",
    "DeletionByTaintManager", "TaintManagerEviction", "Killed",
    # the car could not fit it after all (its capacity changed): another car may
    "OutOfcpu", "OutOfmemory", "OutOfaccelerator", "UnexpectedAdmissionError",
})


def classify(reason: str | None) -> Outcome:
    return Outcome.DEPARTURE if reason in DEPARTURES else Outcome.FAILURE
