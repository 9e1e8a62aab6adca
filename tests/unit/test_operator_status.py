"""A FleetJob's status (``reconcile.status``) is its UI: a phase, six conditions that say why with a reason a
program can read and a message a person can act on (a job waiting for cars quotes the scheduler), counts, items,
energy and cost; ``lastTransitionTime`` moves only when a condition flips and ``observedGeneration`` says which
spec the status describes."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fleetlet_operator.reconcile.model import Counts, Plan
from fleetlet_operator.reconcile.status import next_status, rejected

from fleetlet.api.v1alpha1 import FleetJob, FleetJobStatus, get_condition
from fleetlet.api.v1alpha1.fleetjob import ConditionType, Result

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
T1, T2, T3 = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2), T0 + timedelta(minutes=3)
TYPES = {"Admitted", "Progressing", "Verified", "Complete", "Failed", "Suspended"}
RESULT = Result(uri="fleetlet://sha256/" + "e" * 64, sha256="e" * 64)
SCHEDULER = "0/12 nodes are available: 12 node(s) had untolerated taint {fleetlet.io/driving: }."


def make_job(*, suspend: bool = False, generation: int = 4, status: FleetJobStatus | None = None,
             items: int = 1000, price: float = 0.4) -> FleetJob:
    job = FleetJob.model_validate({
        "metadata": {"name": "job", "namespace": "default", "uid": "uid-1", "generation": generation},
        "spec": {
            "model": {"uri": "fleetlet://artifacts/model.onnx", "sha256": hashlib.sha256(b"m").hexdigest()},
            "input": {"uri": "fleetlet://artifacts/input.npy", "items": items},
            "shardSize": 100,
            "verification": {"replicas": 2, "quorum": 2},
            "suspend": suspend,
            "budget": {"pricePerKWh": price},
        },
    })
    job.status = status
    return job


def make_plan(*, failed: tuple[str, str] | None = None, **counts: Any) -> Plan:
    c = Counts(total=10, **counts)
    c.pending = c.total - c.running - c.succeeded - c.verified - c.failed
    return Plan(counts=c, failed=failed)


def status(job: FleetJob, p: Plan, now: datetime = T0, result: Result | None = None) -> FleetJobStatus:
    return next_status(job, p, total_shards=10, now=now, started_at=T0, result=result)


def conditions(st: FleetJobStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in st.conditions}


def message(st: FleetJobStatus, type_: str) -> str:
    c = get_condition(st.conditions, type_)
    assert c is not None
    return c.message


# ---- phases and their conditions -------------------------------------------------------------------------------


CASES: list[tuple[str, dict[str, Any], str, dict[str, tuple[str, str]]]] = [
    ("pending", {"plan": make_plan(unschedulable=SCHEDULER)}, "Pending", {
        "Admitted": ("True", "ShardsPlanned"), "Progressing": ("False", "WaitingForCars"),
        "Verified": ("False", "QuorumPending"), "Complete": ("False", "WaitingForCars"),
        "Failed": ("False", "ShardsRunning"), "Suspended": ("False", "ShardsRunning")}),
    ("running", {"plan": make_plan(running=3, verified=2)}, "Running", {
        "Admitted": ("True", "ShardsPlanned"), "Progressing": ("True", "ShardsRunning"),
        "Verified": ("False", "QuorumPending"), "Complete": ("False", "ShardsRunning"),
        "Failed": ("False", "ShardsRunning"), "Suspended": ("False", "ShardsRunning")}),
    ("suspended", {"plan": make_plan(verified=2), "suspend": True}, "Suspended", {
        "Admitted": ("True", "ShardsPlanned"), "Progressing": ("False", "SuspendedByUser"),
        "Verified": ("False", "QuorumPending"), "Suspended": ("True", "SuspendedByUser"),
        "Failed": ("False", "ShardsRunning"), "Complete": ("False", "WaitingForCars")}),
    ("succeeded", {"plan": make_plan(verified=10), "result": RESULT}, "Succeeded", {
        "Admitted": ("True", "ShardsPlanned"), "Progressing": ("False", "Succeeded"),
        "Verified": ("True", "AllShardsVerified"), "Complete": ("True", "Succeeded"),
        "Failed": ("False", "Succeeded"), "Suspended": ("False", "ShardsRunning")}),
    ("failed", {"plan": make_plan(failed=("RetriesExhausted", "shard 3 failed: OOMKilled"),
                                  verified=4)}, "Failed", {
        "Admitted": ("True", "ShardsPlanned"), "Progressing": ("False", "RetriesExhausted"),
        "Verified": ("False", "QuorumPending"), "Complete": ("False", "RetriesExhausted"),
        "Failed": ("True", "RetriesExhausted"), "Suspended": ("False", "ShardsRunning")}),
    ("failed-while-suspended", {"plan": make_plan(failed=("DeadlineExceeded", "past 600 s")), "suspend": True},
     "Failed", {"Failed": ("True", "DeadlineExceeded"), "Suspended": ("False", "SuspendedByUser")}),
]


def _case(kw: dict[str, Any]) -> FleetJobStatus:
    p = kw["plan"]
    return status(make_job(suspend=kw.get("suspend", False)), p, result=kw.get("result"))


@pytest.mark.parametrize("name, kw, phase, expected", CASES, ids=[c[0] for c in CASES])
def test_each_phase_sets_all_six_conditions_with_their_reasons(
        name: str, kw: dict[str, Any], phase: str, expected: dict[str, tuple[str, str]]) -> None:
    st = _case(kw)
    assert st.phase == phase
    got = conditions(st)
    assert set(got) == TYPES and len(st.conditions) == 6
    assert {k: got[k] for k in expected} == expected


def test_a_job_waiting_for_cars_says_what_the_scheduler_says() -> None:
    st = status(make_job(), make_plan(unschedulable=SCHEDULER))
    assert SCHEDULER in message(st, "Progressing")
    assert "parked cars" in message(status(make_job(), make_plan()), "Progressing")


def test_a_running_job_whose_other_shards_cannot_be_placed_says_why_too() -> None:
    st = status(make_job(), make_plan(running=1, verified=3, unschedulable=SCHEDULER))
    assert st.phase == "Running"
    assert SCHEDULER in message(st, "Progressing")


def test_a_failed_job_says_what_failed_and_when_it_ended() -> None:
    st = status(make_job(), make_plan(failed=("BudgetExceeded", "the cars spent 5.000 kWh, over 4 kWh")), now=T1)
    assert (st.phase, st.completion_time) == ("Failed", T1)
    assert message(st, "Failed") == "the cars spent 5.000 kWh, over 4 kWh"
    assert st.result is None


def test_a_succeeded_job_carries_its_result_and_completion_time() -> None:
    st = status(make_job(), make_plan(verified=10), now=T2, result=RESULT)
    assert (st.phase, st.result, st.completion_time) == ("Succeeded", RESULT, T2)
    assert RESULT.sha256 in message(st, "Complete")
    later = status(make_job(status=st), make_plan(verified=10), now=T3, result=RESULT)
    assert later.completion_time == T2


# ---- numbers -----------------------------------------------------------------------------------------------------


def test_counts_items_energy_and_cost_are_copied_from_the_plan() -> None:
    p = make_plan(running=2, succeeded=1, verified=3, items_done=345, energy_kwh=1.23456789012)
    st = status(make_job(price=0.5), p)
    assert st.shards.wire() == {"total": 10, "pending": 4, "running": 2, "succeeded": 1, "verified": 3, "failed": 0}
    assert (st.items_done, st.items_total) == (345, 1000)
    assert st.energy_kwh == pytest.approx(1.23456789)
    assert st.cost == pytest.approx(0.617284)
    assert st.start_time == T0


def test_items_done_never_exceeds_the_input() -> None:
    assert status(make_job(items=1000), make_plan(items_done=1500)).items_done == 1000


def test_the_start_time_is_kept_once_set() -> None:
    first = status(make_job(), make_plan(running=1))
    again = next_status(make_job(status=first), make_plan(running=1), total_shards=10, now=T2, started_at=T2,
                        result=None)
    assert again.start_time == T0


# ---- lastTransitionTime and observedGeneration -----------------------------------------------------------------


def ltt(st: FleetJobStatus) -> dict[str, datetime]:
    return {c.type: c.last_transition_time for c in st.conditions}


def test_last_transition_time_moves_only_when_a_condition_flips() -> None:
    pending = status(make_job(), make_plan(unschedulable=SCHEDULER), now=T0)
    assert set(ltt(pending).values()) == {T0}
    # Same state a minute later, with new numbers in the messages: nothing flipped, nothing moves.
    still = status(make_job(status=pending), make_plan(unschedulable="another complaint"), now=T1)
    assert ltt(still) == ltt(pending)
    assert "another complaint" in message(still, "Progressing")
    # Running: Progressing flips; Complete stays False (its reason changes, its time does not).
    running = status(make_job(status=still), make_plan(running=2), now=T2)
    assert ltt(running) == {**ltt(pending), "Progressing": T2}
    assert conditions(running)["Complete"] == ("False", "ShardsRunning")
    done = status(make_job(status=running), make_plan(verified=10), now=T3, result=RESULT)
    assert ltt(done) == {**ltt(running), "Progressing": T3, "Verified": T3, "Complete": T3}
    assert ltt(status(make_job(status=done), make_plan(verified=10), now=T3 + timedelta(hours=1),
                      result=RESULT)) == ltt(done)


def test_observed_generation_is_the_spec_the_status_was_computed_from() -> None:
    st = status(make_job(generation=7), make_plan(running=1))
    assert st.observed_generation == 7
    assert {c.observed_generation for c in st.conditions} == {7}


def test_suspending_and_resuming_flips_the_suspended_condition() -> None:
    running = status(make_job(), make_plan(running=2), now=T0)
    suspended = status(make_job(suspend=True, status=running), make_plan(verified=1), now=T1)
    assert (suspended.phase, conditions(suspended)["Suspended"]) == ("Suspended", ("True", "SuspendedByUser"))
    assert ltt(suspended)["Suspended"] == T1
    resumed = status(make_job(status=suspended), make_plan(running=2), now=T2)
    assert (resumed.phase, conditions(resumed)["Suspended"][0]) == ("Running", "False")
    assert ltt(resumed)["Suspended"] == T2


# ---- a spec that cannot run -----------------------------------------------------------------------------------


def test_a_rejected_job_fails_with_the_reason_and_what_to_fix() -> None:
    why = "spec.input.items is 1000 but the input holds 999 items; fix spec.input.items"
    st = rejected(make_job(generation=2), "InputItemsMismatch", why, T1)
    assert (st.phase, st.observed_generation, st.completion_time) == ("Failed", 2, T1)
    got = conditions(st)
    assert got["Admitted"] == ("False", "InputItemsMismatch")
    assert got["Failed"] == ("True", "InputItemsMismatch")
    assert got["Progressing"][0] == "False"
    assert message(st, "Admitted") == why


def test_a_fixed_spec_is_admitted_again_and_the_admitted_condition_flips() -> None:
    bad = rejected(make_job(generation=2), "InputNotFound", "no blob at the input uri", T0)
    fixed = status(make_job(generation=3, status=bad), make_plan(running=1), now=T2)
    assert fixed.phase == "Running"
    assert conditions(fixed)["Admitted"] == ("True", "ShardsPlanned")
    assert conditions(fixed)["Failed"][0] == "False"
    assert ltt(fixed)["Admitted"] == T2 and ltt(fixed)["Failed"] == T2
    assert fixed.observed_generation == 3


def test_a_status_round_trips_through_the_api() -> None:
    st = status(make_job(), replace(make_plan(running=1), failed=None), now=T0)
    assert FleetJobStatus.model_validate(st.wire()) == st
    assert ConditionType.PROGRESSING.value in {c["type"] for c in st.wire()["conditions"]}
