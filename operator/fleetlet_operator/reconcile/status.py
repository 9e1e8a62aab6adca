"""A FleetJob's status from one plan: counts, items, energy and cost, times, result, and the conditions a person
reads (Admitted, Progressing, Verified, Complete, Failed, Suspended), each with a reason and a message that says
why — a job waiting for cars says what the scheduler says about them, never just "Pending".

``lastTransitionTime`` moves only when a condition's status flips; ``observedGeneration`` is set to the generation
this status was computed from (the controller writes it only after a successful reconcile).
"""

from __future__ import annotations

from datetime import datetime

from fleetlet.api.v1alpha1 import FleetJob, set_condition
from fleetlet.api.v1alpha1.fleetjob import (
    ConditionType,
    FleetJobStatus,
    Phase,
    Reason,
    Result,
    ShardCounts,
)

from .model import Plan

TERMINAL: tuple[Phase, ...] = ("Succeeded", "Failed")


def rejected(job: FleetJob, reason: str, message: str, now: datetime) -> FleetJobStatus:
    """The status of a job whose spec cannot run (an input that does not exist, an unsupported URI)."""
    st = (job.status or FleetJobStatus()).model_copy(deep=True)
    gen = job.metadata.generation
    st.phase = "Failed"
    st.conditions = set_condition(st.conditions, ConditionType.ADMITTED, "False", reason, message, now, gen)
    st.conditions = set_condition(st.conditions, ConditionType.FAILED, "True", reason, message, now, gen)
    st.conditions = set_condition(st.conditions, ConditionType.PROGRESSING, "False", reason,
                                  "nothing runs until the spec is fixed", now, gen)
    st.completion_time = st.completion_time or now
    st.observed_generation = gen
    return st


def next_status(job: FleetJob, plan: Plan, *, total_shards: int, now: datetime, started_at: datetime,
                result: Result | None) -> FleetJobStatus:
    spec = job.spec
    st = (job.status or FleetJobStatus()).model_copy(deep=True)
    gen = job.metadata.generation
    c = plan.counts
    st.shards = ShardCounts(total=total_shards, pending=c.pending, running=c.running, succeeded=c.succeeded,
                            verified=c.verified, failed=c.failed)
    st.items_total = spec.input.items
    st.items_done = min(c.items_done, spec.input.items)
    st.energy_kwh = round(c.energy_kwh, 9)
    st.cost = round(c.energy_kwh * spec.budget.price_per_kwh, 6)
    st.start_time = st.start_time or started_at

    def cond(type_: str, status: str, reason: str, message: str) -> None:
        st.conditions = set_condition(st.conditions, type_, status, reason, message, now, gen)  # type: ignore[arg-type]

    cond(ConditionType.ADMITTED, "True", Reason.PLANNED,
         f"{total_shards} shards of up to {spec.shard_size} items, {spec.verification.replicas} replica(s) each, "
         f"accepted on {spec.verification.quorum} matching result(s)")
    progress = (f"{c.verified}/{total_shards} shards verified, {c.running} running, {c.succeeded} awaiting "
                f"verification, {c.pending} waiting; {c.departures} departures and {c.failures} failures so far")
    if c.unschedulable and c.pending:  # shards that wait say why, also while others run
        progress += f"; waiting for cars: {c.unschedulable}"
    if plan.failed is not None:
        reason, message = plan.failed
        st.phase = "Failed"
        cond(ConditionType.FAILED, "True", reason, message)
        cond(ConditionType.PROGRESSING, "False", reason, message)
        cond(ConditionType.COMPLETE, "False", reason, message)
        st.completion_time = st.completion_time or now
    elif result is not None:
        st.phase = "Succeeded"
        st.result = result
        cond(ConditionType.COMPLETE, "True", Reason.SUCCEEDED,
             f"{spec.input.items} items in {total_shards} shards; result sha256:{result.sha256}")
        cond(ConditionType.PROGRESSING, "False", Reason.SUCCEEDED, "done")
        cond(ConditionType.FAILED, "False", Reason.SUCCEEDED, "no shard failed")
        st.completion_time = st.completion_time or now
    elif spec.suspend:
        st.phase = "Suspended"
        cond(ConditionType.PROGRESSING, "False", Reason.SUSPENDED_BY_USER,
             f"suspended: running shards stop at a checkpoint and resume from it later; {progress}")
    elif c.running or c.succeeded or c.verified:
        st.phase = "Running"
        cond(ConditionType.PROGRESSING, "True", Reason.RUNNING, progress)
    else:
        st.phase = "Pending"
        why = c.unschedulable or "the shard pods wait to be placed on parked cars"
        cond(ConditionType.PROGRESSING, "False", Reason.WAITING_FOR_CARS, f"no car can take a shard yet: {why}")
    if plan.failed is None and result is None:
        cond(ConditionType.COMPLETE, "False", Reason.RUNNING if st.phase == "Running" else Reason.WAITING_FOR_CARS,
             progress)
        cond(ConditionType.FAILED, "False", Reason.RUNNING, "no shard has failed for good")
    cond(ConditionType.SUSPENDED, "True" if spec.suspend and st.phase not in TERMINAL else "False",
         Reason.SUSPENDED_BY_USER if spec.suspend else Reason.RUNNING,
         "spec.suspend is true" if spec.suspend else "spec.suspend is false")
    if c.verified == total_shards and total_shards:
        cond(ConditionType.VERIFIED, "True", Reason.ALL_VERIFIED,
             f"every shard's result was accepted ({spec.verification.quorum} matching result(s) from different "
             "cars and owners, or a trusted car's result)")
    else:
        cond(ConditionType.VERIFIED, "False", Reason.QUORUM_PENDING, f"{c.verified}/{total_shards} shards verified")
    st.observed_generation = gen
    return st
