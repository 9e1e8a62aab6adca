"""The FleetJob planner (``reconcile.shards.plan``) keeps the FleetJob issue's promises, with no cluster: shards
start in order within ``parallelism``; a car that leaves costs only the work since its checkpoint, never a retry;
the shard's own failures back off and end the job when ``retries`` is spent; results are accepted only on a quorum
of different cars and owners (BOINC's adaptive replication for single-replica jobs); the deadline and the budget
stop a job; counts add up; a 100,000-shard job plans in milliseconds with an O(1) plan. Also the ledger's wire
format, which carries resume points across an operator restart."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fleetlet_operator.reconcile.model import (
    Carried,
    CarView,
    LedgerEntry,
    Plan,
    PodCreate,
    PodView,
    ResumePoint,
    TrustVerdict,
)
from fleetlet_operator.reconcile.reasons import DEPARTURES, GONE, Outcome, classify
from fleetlet_operator.reconcile.shards import JobInputs, PlanSettings, audit_roll, plan
from fleetlet_operator.reconcile.status import next_status

from fleetlet.api.v1alpha1 import FleetJob
from fleetlet.api.v1alpha1.shard import ShardCheckpoint, ShardReport

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
UID = "3f1c2a9e-0000-4000-8000-00000000f1ee"
SETTINGS = PlanSettings(resync_s=3600.0)  # a long resync, so requeue_after shows the planner's own reasons

# Cars: two owners own two cars each; "car-u" lost trust; "car-t*" have long runs of valid results.
CARS: dict[str, CarView] = {
    "car-a": CarView(owner="owner-a"),
    "car-a2": CarView(owner="owner-a"),
    "car-b": CarView(owner="owner-b"),
    "car-b2": CarView(owner="owner-b"),
    "car-c": CarView(owner="owner-c"),
    "car-d": CarView(owner="owner-d"),
    "car-e": CarView(owner="owner-e"),
    "car-u": CarView(owner="owner-u", valid_streak=50, untrusted=True),
}


def sha(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


D1, D2, D3 = sha("result-1"), sha("result-2"), sha("result-3")


def ck(items_done: int, tag: str = "") -> ShardCheckpoint:
    return ShardCheckpoint(sha256=sha(f"checkpoint-{items_done}-{tag}"), items_done=items_done)


def make_job(*, items: int = 100, shard_size: int = 10, parallelism: int = 10, replicas: int = 1, quorum: int = 1,
             spot_check_rate: float = 0.0, retries: int = 3, suspend: bool = False, deadline: int | None = None,
             budget: Mapping[str, Any] | None = None, uid: str = UID) -> FleetJob:
    return FleetJob.model_validate({
        "metadata": {"name": "job", "namespace": "default", "uid": uid, "generation": 1},
        "spec": {
            "model": {"uri": "fleetlet://artifacts/model.onnx", "sha256": sha("model")},
            "input": {"uri": "fleetlet://artifacts/input.npy", "items": items},
            "shardSize": shard_size,
            "parallelism": parallelism,
            "verification": {"replicas": replicas, "quorum": quorum, "spotCheckRate": spot_check_rate},
            "retries": retries,
            "suspend": suspend,
            **({"deadlineSeconds": deadline} if deadline is not None else {}),
            **({"budget": dict(budget)} if budget is not None else {}),
        },
    })


def pod(shard: int, replica: int = 0, attempt: int = 0, phase: str = "Running", node: str = "car-a", *,
        reason: str | None = None, items_done: int = 0, checkpoint: ShardCheckpoint | None = None,
        result: str | None = None, energy: float = 0.0, resume: ShardCheckpoint | None = None,
        carried: Carried | None = None, finished_at: datetime | None = None, created_at: datetime = T0,
        unschedulable: str | None = None, deleting: bool = False, report: bool = True) -> PodView:
    """A shard pod as the job controller would view it. ``report=False``: the car has said nothing yet."""
    words = ShardReport(items_done=items_done, checkpoint=checkpoint, result_sha256=result, energy_kwh=energy)
    return PodView(
        name=f"job-{shard}-{replica}-{attempt}", shard=shard, replica=replica, attempt=attempt, phase=phase,
        node=node, created_at=created_at, reason=reason, report=words if report else None, resume=resume,
        carried=carried or Carried(), deleting=deleting,
        finished_at=finished_at if finished_at is not None else (T0 if phase in ("Succeeded", "Failed") else None),
        unschedulable=unschedulable,
    )


def done(shard: int, node: str, digest: str | None = D1, replica: int = 0, attempt: int = 0, **kw: Any) -> PodView:
    """A pod whose car reported a result for the whole 10-item shard."""
    kw.setdefault("items_done", 10)
    return pod(shard, replica, attempt, "Succeeded", node, result=digest, **kw)


def inputs(job: FleetJob | None = None, *, pods: Iterable[PodView] = (), ledger: Mapping[int, LedgerEntry] | None = None,
           cars: Mapping[str, CarView] | None = None, classes: Mapping[int, Sequence[Sequence[str]]] | None = None,
           now: datetime = T0, started_at: datetime = T0, settings: PlanSettings = SETTINGS,
           total: int | None = None) -> JobInputs:
    job = job or make_job()
    by_shard: dict[int, list[PodView]] = {}
    for p in pods:
        by_shard.setdefault(p.shard, []).append(p)
    if total is None:
        total = math.ceil(job.spec.input.items / job.spec.shard_size)
    return JobInputs(job=job, total_shards=total, pods=by_shard, ledger=dict(ledger or {}),
                     cars=dict(CARS if cars is None else cars), classes=dict(classes or {}), started_at=started_at,
                     now=now, settings=settings)


def run(job: FleetJob | None = None, **kw: Any) -> Plan:
    return plan(inputs(job, **kw))


def creates_of(out: Plan, shard: int) -> list[PodCreate]:
    return [c for c in out.creates if c.shard == shard]


def accepted(digest: str = D1, energy: float = 0.0, cars: tuple[str, ...] = ("car-a",)) -> LedgerEntry:
    return LedgerEntry(accepted=digest, energy_kwh=energy, cars=cars)


def verdicts(out: Plan) -> dict[str, tuple[bool, bool]]:
    return {v.car: (v.valid, v.sole) for v in out.trust}


def shard_with_roll(pred: Any, uid: str = UID) -> int:
    """The first shard index whose audit roll satisfies ``pred``."""
    return next(i for i in range(10_000) if pred(audit_roll(uid, i)))


# ---- shards, parallelism, scale ------------------------------------------------------------------------------


def test_shards_are_planned_from_items_and_shard_size_the_last_one_short() -> None:
    inp = inputs(make_job(items=95, shard_size=10))
    assert inp.total_shards == 10
    assert [inp.items(i) for i in range(10)] == [10] * 9 + [5]


@pytest.mark.parametrize("parallelism, settled, running, expected", [
    (4, set(), set(), [0, 1, 2, 3]),
    (4, {0, 1}, {2, 3}, [4, 5]),  # settled shards free their slots, in-flight ones hold theirs
    (4, {0, 2}, {1}, [3, 4, 5]),  # new shards start in index order, skipping started ones
    (3, set(), {0, 1, 2}, []),  # full
    (20, set(), set(), list(range(10))),  # never beyond the last shard
])
def test_new_shards_start_in_index_order_within_parallelism(
        parallelism: int, settled: set[int], running: set[int], expected: list[int]) -> None:
    out = run(make_job(parallelism=parallelism),
              pods=[pod(i) for i in running], ledger={i: accepted() for i in settled})
    assert [c.shard for c in out.creates] == expected
    assert all(c.attempt == 0 and c.replica == 0 and c.resume is None and c.cause == "" for c in out.creates)


def test_parallelism_counts_shards_not_pods_for_replicated_jobs() -> None:
    out = run(make_job(parallelism=3, replicas=3, quorum=2))
    assert sorted((c.shard, c.replica) for c in out.creates) == [(s, r) for s in range(3) for r in range(3)]


def test_creations_per_plan_are_capped_and_the_plan_asks_to_run_again() -> None:
    out = run(make_job(items=1000, shard_size=1, parallelism=1000), settings=replace(SETTINGS, max_creates=50))
    assert [c.shard for c in out.creates] == list(range(50))
    assert out.more
    assert not run(make_job(parallelism=3)).more


def timed(inp: JobInputs) -> tuple[float, Plan]:
    """The best of three runs: the figure is the planner's, not a busy test machine's."""
    best, out = math.inf, Plan()
    for _ in range(3):
        t = time.perf_counter()
        out = plan(inp)
        best = min(best, time.perf_counter() - t)
    return best, out


def test_a_100k_shard_job_with_parallelism_10_creates_10_pods_fast_with_an_o1_plan() -> None:
    job = make_job(items=100_000, shard_size=1, parallelism=10)
    fresh = inputs(job)
    assert fresh.total_shards == 100_000
    fresh_s, out = timed(fresh)
    assert [c.shard for c in out.creates] == list(range(10))
    assert not out.deletes and not out.ledger and not out.events and not out.compare
    assert (out.counts.total, out.counts.pending) == (100_000, 100_000)

    # Half way: 50,000 shards settled in the ledger, 10 running. Still one small plan.
    ledger = {i: accepted(energy=0.001) for i in range(50_000)}
    half = inputs(job, pods=[pod(i, items_done=0) for i in range(50_000, 50_010)], ledger=ledger)
    half_s, out = timed(half)
    assert out.creates == [] and out.ledger == {} and out.deletes == []
    assert (out.counts.verified, out.counts.running, out.counts.items_done) == (50_000, 10, 50_000)
    assert fresh_s < 0.05 and half_s < 0.5, (fresh_s, half_s)

    # The status written from it is O(1) in the number of shards: no per-shard data.
    small = next_status(make_job(), plan(inputs()), total_shards=10, now=T0, started_at=T0, result=None)
    big = next_status(job, out, total_shards=100_000, now=T0, started_at=T0, result=None)
    assert len(json.dumps(big.wire(), default=str)) < len(json.dumps(small.wire(), default=str)) + 100


# ---- departures ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", sorted(DEPARTURES))
def test_every_way_a_car_leaves_is_a_departure(reason: str) -> None:
    assert classify(reason) is Outcome.DEPARTURE


@pytest.mark.parametrize("reason", ["ModelError", "OOMKilled", "DigestMismatch", "ResultInvalid", "Error",
                                    "SomethingNobodyListed", None])
def test_the_shards_own_failures_and_unknown_reasons_are_failures(reason: str | None) -> None:
    assert classify(reason) is Outcome.FAILURE


@pytest.mark.parametrize("phase, reason", [
    ("Failed", "CarLeftParked"), ("Failed", "BatteryCritical"), ("Failed", "Evicted"),
    ("Failed", "PausedByOwner"), ("Gone", GONE), ("Gone", None),
])
def test_a_departure_resumes_from_the_checkpoint_in_a_new_attempt_without_spending_a_retry(
        phase: str, reason: str | None) -> None:
    earlier = Carried(energy_kwh=0.1, departures=1, cars=("car-z",))
    left = pod(3, attempt=1, phase=phase, node="car-a", reason=reason, items_done=7, checkpoint=ck(6),
               resume=ck(2), energy=0.25, carried=earlier)
    out = run(make_job(retries=0), pods=[left])
    carried = Carried(energy_kwh=0.35, departures=2, cars=("car-z", "car-a"))
    assert creates_of(out, 3) == [PodCreate(3, 0, 2, ck(6), carried, cause="departure")]
    # Durable first: the ledger holds where to resume and what it cost, in this same plan.
    assert out.ledger[3].resume_of(0) == ResumePoint(ck(6), carried, 2)
    assert not out.ledger[3].settled
    assert out.failed is None
    assert (out.counts.failures, out.counts.departures) == (0, 2)  # the earlier departure and this one
    # The departed pod goes (a vanished one is already gone).
    assert (left.name in out.deletes) == (phase != "Gone")


@pytest.mark.parametrize("deleting", [False, True])
def test_a_pod_on_a_car_lost_past_the_limit_resumes_elsewhere_even_if_kubernetes_never_evicts_it(
        deleting: bool) -> None:
    """The node lifecycle controller stops NoExecute tainting in a zone where most Nodes are NotReady; a fleet
    whose cars drop off together is such a zone, so the planner does not wait for an eviction that never comes."""
    settings = replace(SETTINGS, lost_car_s=180.0)
    lost = {**CARS, "car-a": replace(CARS["car-a"], lost_since=T0)}
    stuck = pod(3, attempt=1, node="car-a", items_done=7, checkpoint=ck(6), resume=ck(2), energy=0.25,
                deleting=deleting)
    # Before the limit: nothing happens yet, but the planner asks to look again when the car would be lost.
    early = run(make_job(retries=0), pods=[stuck], cars=lost, settings=settings, now=T0 + timedelta(seconds=100))
    assert creates_of(early, 3) == [] and early.force_deletes == [] and early.requeue_after == pytest.approx(80.0)
    # Past it: a departure like any other, resumed from the checkpoint without a retry; the pod is deleted at once.
    out = run(make_job(retries=0), pods=[stuck], cars=lost, settings=settings, now=T0 + timedelta(seconds=181))
    carried = Carried(energy_kwh=0.25, departures=1, cars=("car-a",))
    assert creates_of(out, 3) == [PodCreate(3, 0, 2, ck(6), carried, cause="departure")]
    assert out.ledger[3].resume_of(0) == ResumePoint(ck(6), carried, 2)
    assert out.force_deletes == [stuck.name] and stuck.name not in out.deletes
    assert [e.reason for e in out.events] == ["CarLost"] and out.failed is None
    # A connected car, or the fallback switched off: nothing is decided for Kubernetes.
    for cars, s in ((CARS, settings), (lost, SETTINGS)):
        quiet = run(make_job(retries=0), pods=[stuck], cars=cars, settings=s, now=T0 + timedelta(days=1))
        assert creates_of(quiet, 3) == [] and quiet.force_deletes == []


def test_a_departure_without_a_newer_checkpoint_resumes_where_the_attempt_started() -> None:
    left = pod(0, attempt=2, phase="Gone", reason=GONE, items_done=4, checkpoint=None, resume=ck(3))
    out = run(pods=[left])
    assert creates_of(out, 0)[0].resume == ck(3)
    assert creates_of(out, 0)[0].attempt == 3


def test_a_departure_before_any_checkpoint_starts_over_and_carries_the_energy() -> None:
    left = pod(0, phase="Failed", reason="CarLeftParked", energy=0.05)
    (create,) = creates_of(run(pods=[left]), 0)
    assert (create.resume, create.carried) == (None, Carried(0.05, 1, ("car-a",)))


def test_many_departures_never_fail_a_shard_with_no_retries() -> None:
    carried = Carried(energy_kwh=0.5, departures=20, cars=("car-b", "car-c"))
    left = pod(0, attempt=20, phase="Failed", reason="CarLeftParked", carried=carried)
    out = run(make_job(retries=0), pods=[left])
    assert out.failed is None
    assert creates_of(out, 0)[0].attempt == 21
    assert creates_of(out, 0)[0].carried.departures == 21


def test_once_the_next_attempt_exists_the_ledger_forgets_the_resume_point() -> None:
    point = ResumePoint(ck(6), Carried(0.2, 1, ("car-a",)), 1)
    ledger = {0: LedgerEntry().with_resume(0, point)}
    out = run(pods=[pod(0, attempt=1, node="car-b", resume=ck(6), carried=point.carried)], ledger=ledger)
    assert out.ledger[0] == LedgerEntry()
    assert creates_of(out, 0) == []


def test_a_suspended_job_creates_nothing_stops_running_pods_and_keeps_the_resume_point() -> None:
    running = pod(1, node="car-b", items_done=3)
    stopped = pod(0, phase="Failed", reason="Stopped", checkpoint=ck(5), energy=0.1)
    out = run(make_job(suspend=True), pods=[running, stopped])
    assert out.creates == []
    assert set(out.deletes) == {running.name, stopped.name}
    assert out.ledger[0].resume_of(0) == ResumePoint(ck(5), Carried(0.1, 1, ("car-a",)), 1)
    assert out.failed is None and not out.complete


def test_after_a_restart_the_next_attempt_is_created_from_the_ledgers_resume_point() -> None:
    point = ResumePoint(ck(6), Carried(0.2, 2, ("car-a", "car-b")), 4)
    out = run(make_job(parallelism=1), ledger={0: LedgerEntry().with_resume(0, point)})
    # The resumed shard holds the only slot: no new shard starts beside it.
    assert [(c.shard, c.attempt, c.resume, c.carried) for c in out.creates] == [(0, 4, ck(6), point.carried)]
    assert out.counts.energy_kwh == pytest.approx(0.2)


def test_a_suspended_job_after_a_restart_still_creates_nothing_and_keeps_the_ledger() -> None:
    point = ResumePoint(ck(6), Carried(0.2, 1, ("car-a",)), 1)
    out = run(make_job(suspend=True), ledger={0: LedgerEntry().with_resume(0, point)})
    assert out.creates == [] and out.ledger == {}  # nothing to change: the point stays as it is


def test_a_resume_point_newer_than_the_replicas_last_pod_wins_after_a_restart() -> None:
    """Attempt 0 failed (kept, it is a retry), attempt 1 departed while the job was suspended and its pod is gone;
    the operator restarted (no tombstone). The ledger says: resume attempt 2 from checkpoint 6, 0.3 kWh spent."""
    failed = pod(0, attempt=0, phase="Failed", reason="OOMKilled", energy=0.1, finished_at=T0 - timedelta(hours=1))
    point = ResumePoint(ck(6), Carried(0.3, 1, ("car-b",)), 2)
    out = run(pods=[failed], ledger={0: LedgerEntry().with_resume(0, point)})
    assert [(c.attempt, c.resume, c.carried) for c in creates_of(out, 0)] == [(2, ck(6), point.carried)]
    assert out.counts.energy_kwh == pytest.approx(0.4)


# ---- failures, retries, backoff --------------------------------------------------------------------------------


def failed_chain(shard: int, n: int, reason: str | None = "OOMKilled", last_finished: datetime = T0,
                 energy: float = 0.0) -> list[PodView]:
    """``n`` failed attempts of replica 0, the last one finished at ``last_finished``."""
    return [pod(shard, attempt=a, phase="Failed", reason=reason, energy=energy, checkpoint=ck(a + 1),
                finished_at=last_finished - timedelta(minutes=10 * (n - 1 - a))) for a in range(n)]


@pytest.mark.parametrize("reason", ["ModelError", "OOMKilled", "DigestMismatch", None, "NeverHeardOfIt"])
def test_a_failure_backs_off_then_retries_from_its_checkpoint(reason: str | None) -> None:
    chain = failed_chain(0, 1, reason=reason, energy=0.02)
    waiting = run(pods=chain, now=T0 + timedelta(seconds=4))
    assert creates_of(waiting, 0) == []
    assert waiting.requeue_after == pytest.approx(6.0)
    assert waiting.counts.failures == 1
    retry = run(pods=chain, now=T0 + timedelta(seconds=10))
    # It resumes from car-a's checkpoint, so car-a shares the result (for trust), but not its energy (counted).
    assert creates_of(retry, 0) == [PodCreate(0, 0, 1, ck(1), Carried(0.0, 0, ("car-a",)), cause="failure")]
    assert retry.deletes == []  # the failed attempt stays: it is the retry count
    assert retry.ledger == {}


def test_a_retry_from_where_the_failed_attempt_started_owes_that_car_nothing() -> None:
    failed = pod(0, attempt=1, phase="Failed", reason="ModelError", resume=ck(4), checkpoint=None,
                 carried=Carried(0.2, 1, ("car-z",)), finished_at=T0 - timedelta(hours=1))
    (retry,) = creates_of(run(pods=[failed]), 0)
    assert (retry.attempt, retry.resume, retry.carried) == (2, ck(4), Carried(0.2, 1, ("car-z",)))


def test_a_wrong_result_resumed_from_a_failed_cars_checkpoint_blames_both_cars() -> None:
    failed = pod(0, 1, 0, "Failed", "car-d", reason="OOMKilled", checkpoint=ck(5), finished_at=T0 - timedelta(hours=1))
    (retry,) = creates_of(run(make_job(replicas=2, quorum=2), pods=[failed, pod(0, 0, node="car-a")]), 0)
    assert retry.carried.cars == ("car-d",)
    pods = [done(0, "car-a", D1), failed, done(0, "car-b", D2, replica=1, attempt=1, resume=ck(5),
                                               carried=retry.carried), done(0, "car-c", D1, replica=2)]
    out = run(make_job(replicas=2, quorum=2), pods=pods, classes={0: [[D1], [D2]]})
    assert out.ledger[0].accepted == D1
    assert verdicts(out)["car-b"] == (False, False) and verdicts(out)["car-d"] == (False, False)


@pytest.mark.parametrize("failures, expected_wait", [(1, 10.0), (2, 20.0), (3, 40.0), (5, 160.0), (6, 300.0),
                                                     (9, 300.0)])
def test_backoff_is_exponential_and_capped(failures: int, expected_wait: float) -> None:
    settings = replace(SETTINGS, backoff_base_s=10.0, backoff_cap_s=300.0)
    out = run(make_job(retries=20), pods=failed_chain(0, failures), settings=settings)
    assert creates_of(out, 0) == []
    assert out.requeue_after == pytest.approx(expected_wait)


def test_when_retries_are_spent_the_shard_and_the_job_fail_and_every_live_pod_goes() -> None:
    chain = failed_chain(0, 3, reason="OOMKilled", energy=0.1)
    others = [pod(1, node="car-b"), pod(2, phase="Pending", node=""), done(3, "car-c", replica=0)]
    out = run(make_job(retries=2), pods=chain + others)
    assert out.failed is not None
    reason, message = out.failed
    assert reason == "RetriesExhausted"
    assert "shard 0" in message and "OOMKilled" in message
    assert out.ledger[0].failed is not None and "OOMKilled" in out.ledger[0].failed
    assert out.ledger[0].energy_kwh == pytest.approx(0.3)
    assert out.creates == []
    assert {"job-1-0-0", "job-2-0-0"} <= set(out.deletes)
    assert not any(p.name in out.deletes for p in chain)  # terminal pods need no stop
    assert any(e.reason == "ShardFailed" and e.type == "Warning" for e in out.events)
    assert not out.complete


def test_one_failed_shard_with_two_exhausted_replicas_counts_once() -> None:
    pods = [pod(0, r, 0, "Failed", node, reason="ModelError", energy=0.1)
            for r, node in ((0, "car-a"), (1, "car-b"))]
    out = run(make_job(replicas=2, quorum=2, retries=1), pods=pods)
    assert out.failed is not None and out.failed[0] == "RetriesExhausted"
    assert out.counts.failed == 1
    assert out.counts.energy_kwh == pytest.approx(0.2)
    assert [e.reason for e in out.events].count("ShardFailed") == 1


def test_a_shard_failed_in_the_ledger_fails_the_job_after_a_restart() -> None:
    """The ledger write landed, the status write did not (crash): the next plan must still fail the job."""
    out = run(ledger={0: LedgerEntry(failed="OOMKilled: out of memory (4 failures, retries: 3)")},
              pods=[pod(1), pod(2)])
    assert out.failed is not None and out.failed[0] == "RetriesExhausted"
    assert "shard 0" in out.failed[1]
    assert out.creates == []
    assert {"job-1-0-0", "job-2-0-0"} <= set(out.deletes)


# ---- verification ----------------------------------------------------------------------------------------------


def test_two_agreeing_results_from_different_cars_and_owners_are_accepted() -> None:
    pods = [done(0, "car-a", energy=0.1), done(0, "car-b", replica=1, energy=0.2), pod(0, 2, node="car-c")]
    out = run(make_job(replicas=2, quorum=2), pods=pods)
    entry = out.ledger[0]
    assert (entry.accepted, entry.cars) == (D1, ("car-a", "car-b"))
    assert entry.energy_kwh == pytest.approx(0.3)
    assert verdicts(out) == {"car-a": (True, True), "car-b": (True, True)}
    assert set(out.deletes) == {p.name for p in pods}
    assert (out.counts.verified, out.counts.items_done) == (1, 10)


def test_two_results_from_one_owners_cars_are_no_quorum_a_third_car_of_another_owner_is_asked() -> None:
    pods = [done(0, "car-a"), done(0, "car-a2", replica=1)]
    out = run(make_job(replicas=2, quorum=2), pods=pods)
    assert 0 not in out.ledger
    (extra,) = creates_of(out, 0)
    assert (extra.replica, extra.attempt) == (2, 0)
    assert (extra.exclude_cars, extra.exclude_owners) == (("car-a", "car-a2"), ("owner-a",))


def test_an_identical_result_from_a_second_car_of_a_winning_owner_is_not_punished() -> None:
    """Cars a and a2 (one owner) agree, c breaks the tie: all three said the same bytes. a2 is no liar."""
    pods = [done(0, "car-a"), done(0, "car-a2", replica=1), done(0, "car-c", replica=2)]
    out = run(make_job(replicas=2, quorum=2), pods=pods)
    assert out.ledger[0].accepted == D1
    assert all(v.valid for v in out.trust)
    assert not any(e.reason == "ResultRejected" for e in out.events)


def test_differing_digests_without_classes_ask_for_a_comparison_first() -> None:
    pods = [done(0, "car-a", D1), done(0, "car-b", D2, replica=1)]
    out = run(make_job(replicas=2, quorum=2), pods=pods)
    assert out.compare == [0]
    assert 0 not in out.ledger and creates_of(out, 0) == [] and out.trust == []


def test_differing_digests_in_one_agreement_class_are_accepted() -> None:
    pods = [done(0, "car-a", D1), done(0, "car-b", D2, replica=1)]
    out = run(make_job(replicas=2, quorum=2), pods=pods, classes={0: [[D1, D2]]})
    assert out.compare == []
    assert out.ledger[0].accepted == D1
    assert verdicts(out) == {"car-a": (True, True), "car-b": (True, True)}


def test_a_digest_the_classes_do_not_cover_asks_for_a_new_comparison() -> None:
    """The tiebreaker's float result (d3, another chip) is new: classes computed for {d1, d2} cannot judge it."""
    pods = [done(0, "car-a", D1), done(0, "car-b", D2, replica=1), done(0, "car-c", D3, replica=2)]
    out = run(make_job(replicas=2, quorum=2), pods=pods, classes={0: [[D1], [D2]]})
    assert out.compare == [0]
    assert creates_of(out, 0) == []  # no fourth replica before the third result is judged
    accepted_now = run(make_job(replicas=2, quorum=2), pods=pods, classes={0: [[D1, D3], [D2]]})
    assert accepted_now.ledger[0].accepted == D1


def test_a_disagreement_adds_a_tiebreaker_on_a_third_car_and_owner() -> None:
    pods = [done(0, "car-a", D1), done(0, "car-b", D2, replica=1)]
    out = run(make_job(replicas=2, quorum=2), pods=pods, classes={0: [[D1], [D2]]})
    (extra,) = creates_of(out, 0)
    assert (extra.replica, extra.exclude_cars, extra.exclude_owners) == (2, ("car-a", "car-b"),
                                                                           ("owner-a", "owner-b"))
    assert [e.reason for e in out.events] == ["ResultsDisagree"]
    assert out.trust == [] and 0 not in out.ledger


def test_a_suspended_job_asks_for_no_tiebreaker_and_announces_none() -> None:
    pods = [done(0, "car-a", D1), done(0, "car-b", D2, replica=1)]
    out = run(make_job(replicas=2, quorum=2, suspend=True), pods=pods, classes={0: [[D1], [D2]]})
    assert out.creates == [] and out.events == []


def test_the_tiebreaker_event_says_why_there_is_no_quorum() -> None:
    disagree = run(make_job(replicas=2, quorum=2), pods=[done(0, "car-a", D1), done(0, "car-b", D2, replica=1)],
                   classes={0: [[D1], [D2]]})
    one_owner = run(make_job(replicas=2, quorum=2), pods=[done(0, "car-a"), done(0, "car-a2", replica=1)])
    assert "disagree" in disagree.events[0].message
    assert "no quorum" in one_owner.events[0].message and "disagree" not in one_owner.events[0].message


def test_the_tiebreaker_decides_the_losing_car_loses_trust_alone_when_it_alone_computed() -> None:
    loser_resumed = Carried(0.0, 1, ("car-d",))  # replica 1 resumed car-d's checkpoint: car-d shares the blame
    pods = [done(0, "car-a", D1), done(0, "car-b", D2, replica=1, attempt=1, carried=loser_resumed),
            done(0, "car-c", D1, replica=2)]
    out = run(make_job(replicas=2, quorum=2), pods=pods, classes={0: [[D1], [D2]]})
    assert out.ledger[0].accepted == D1 and out.ledger[0].cars == ("car-a", "car-c")
    assert verdicts(out) == {"car-a": (True, True), "car-c": (True, True),
                             "car-b": (False, False), "car-d": (False, False)}
    sole = run(make_job(replicas=2, quorum=2), classes={0: [[D1], [D2]]},
               pods=[done(0, "car-a", D1), done(0, "car-b", D2, replica=1), done(0, "car-c", D1, replica=2)])
    assert verdicts(sole)["car-b"] == (False, True)
    assert [e.reason for e in sole.events] == ["ResultRejected"]


def test_tiebreakers_are_bounded_then_the_shard_fails() -> None:
    settings = replace(SETTINGS, max_extra_replicas=1)
    pods = [done(0, "car-a", D1), done(0, "car-b", D2, replica=1), done(0, "car-c", D3, replica=2)]
    out = run(make_job(replicas=2, quorum=2), pods=pods, classes={0: [[D1], [D2], [D3]]}, settings=settings)
    assert creates_of(out, 0) == []
    assert out.ledger[0].failed is not None and out.failed is not None
    assert out.counts.failed == 1


def test_results_from_an_untrusted_car_are_ignored() -> None:
    pods = [done(0, "car-u"), done(0, "car-b", replica=1)]
    out = run(make_job(replicas=2, quorum=2), pods=pods)
    assert out.ledger.get(0) is None or not out.ledger[0].settled  # not accepted on car-u's word
    assert all(v.car != "car-u" for v in out.trust)
    again = [c for c in out.creates if c.shard == 0 and c.replica == 0]
    assert again and again[0].resume is None and again[0].cause == "distrusted"  # re-run, not resumed from it


def test_a_result_from_a_car_that_lost_trust_gets_the_replica_run_again_without_a_retry() -> None:
    out = run(pods=[done(0, "car-u")])
    again = creates_of(out, 0)
    assert again and again[0].cause == "distrusted" and out.counts.failures == 0
# ---- backtracking: a car caught lying loses the results it alone vouched for -----------------------------------


def test_an_accepted_result_that_rests_on_a_car_that_lost_trust_is_withdrawn_and_the_shard_runs_again() -> None:
    ledger = {0: LedgerEntry(accepted=D1, energy_kwh=0.5, cars=("car-u",), departures=1, attempts=3),
              1: accepted(cars=("car-a",))}
    out = run(make_job(items=20), ledger=ledger)
    assert out.reopened == [0]
    entry = out.ledger[0]
    assert not entry.settled and entry.reopened == 1
    assert entry.resume_of(0) == ResumePoint(None, Carried(0.5, 1), 3)  # what it cost stays counted
    (again,) = creates_of(out, 0)
    # From the start (the untrusted car's checkpoints are not trusted either), past every earlier pod's name.
    assert (again.replica, again.attempt, again.resume) == (0, 3, None)
    assert 1 not in out.ledger and creates_of(out, 1) == []  # a trusted car's result stands
    assert (out.counts.verified, out.counts.energy_kwh) == (1, 0.5)
    assert not out.complete
    (event,) = [e for e in out.events if e.reason == "ResultWithdrawn"]
    assert event.type == "Warning" and "car-u" in event.message and "shard 0" in event.message


def test_a_result_also_vouched_for_by_a_trusted_car_is_not_withdrawn() -> None:
    out = run(make_job(items=10, replicas=2, quorum=2), ledger={0: accepted(cars=("car-u", "car-b"))})
    assert out.reopened == [] and out.complete


def test_a_withdrawn_shard_whose_old_pod_still_shows_is_run_again_past_it() -> None:
    ledger = {0: LedgerEntry(accepted=D1, cars=("car-u",), attempts=1)}
    out = run(make_job(items=10), ledger=ledger, pods=[done(0, "car-u", deleting=True)])
    (again,) = creates_of(out, 0)
    assert (again.replica, again.attempt) == (0, 1)


def test_a_withdrawn_replicated_shard_runs_every_replica_again_and_counts_its_energy_once() -> None:
    ledger = {0: LedgerEntry(accepted=D1, energy_kwh=0.4, cars=("car-u",), attempts=2)}
    out = run(make_job(items=10, replicas=2, quorum=1), ledger=ledger)
    assert sorted((c.replica, c.attempt) for c in creates_of(out, 0)) == [(0, 2), (1, 2)]
    assert out.counts.energy_kwh == pytest.approx(0.4)


def test_an_accepted_entry_records_one_past_its_highest_attempt() -> None:
    pods = [pod(0, 0, 0, "Failed", reason="CarLeftParked", checkpoint=ck(3)),
            done(0, "car-a", attempt=1, resume=ck(3))]
    out = run(make_job(items=10), pods=pods, cars={**CARS, "car-a": CarView(owner="owner-a", valid_streak=50)})
    assert out.ledger[0].accepted == D1 and out.ledger[0].attempts == 2


# (A pod that succeeded without a result digest never reaches the planner as Succeeded: the job controller turns
# it into a failure, NoResult; see jobs._views.)


# ---- adaptive replication (BOINC) ------------------------------------------------------------------------------


@pytest.mark.parametrize("streak", [0, 1, 9])
def test_a_single_replica_result_from_a_car_without_a_trust_streak_is_always_audited(streak: int) -> None:
    cars = {**CARS, "car-a": CarView(owner="owner-a", valid_streak=streak)}
    out = run(pods=[done(0, "car-a")], cars=cars)
    assert 0 not in out.ledger
    (audit,) = creates_of(out, 0)
    assert (audit.replica, audit.attempt) == (1, 0)
    assert (audit.exclude_cars, audit.exclude_owners) == (("car-a",), ("owner-a",))


def test_an_audited_result_is_accepted_only_when_the_second_car_agrees() -> None:
    first = done(0, "car-a")
    running = run(pods=[first, pod(0, 1, node="car-b")])
    assert 0 not in running.ledger and creates_of(running, 0) == []
    agreed = run(pods=[first, done(0, "car-b", replica=1)])
    assert agreed.ledger[0].accepted == D1
    assert verdicts(agreed) == {"car-a": (True, True), "car-b": (True, True)}
    same_owner = run(pods=[first, done(0, "car-a2", replica=1)])
    assert 0 not in same_owner.ledger
    disagreed = run(pods=[first, done(0, "car-b", D2, replica=1)], classes={0: [[D1], [D2]]})
    assert 0 not in disagreed.ledger
    assert [c.replica for c in creates_of(disagreed, 0)] == [2]


def test_an_audit_whose_car_departs_resumes_away_from_the_audited_car_and_owner() -> None:
    left = pod(0, 1, 0, "Failed", "car-b", reason="CarLeftParked", checkpoint=ck(4), energy=0.1)
    out = run(pods=[done(0, "car-a"), left])
    (again,) = creates_of(out, 0)
    assert (again.replica, again.attempt, again.resume, again.cause) == (1, 1, ck(4), "departure")
    assert (again.exclude_cars, again.exclude_owners) == (("car-a",), ("owner-a",))
    assert 0 not in out.ledger or out.ledger[0].accepted is None


@pytest.mark.parametrize("spot_check_rate, streak", [(0.0, 10), (0.0, 40), (0.3, 40), (0.05, 10)])
def test_a_trusted_car_is_audited_exactly_when_the_roll_is_under_max_of_spot_rate_and_one_over_streak(
        spot_check_rate: float, streak: int) -> None:
    chance = max(spot_check_rate, 1.0 / streak)
    audited_shard = shard_with_roll(lambda r: r < chance)
    trusted_shard = shard_with_roll(lambda r: r >= chance)
    cars = {**CARS, "car-a": CarView(owner="owner-a", valid_streak=streak)}
    job = make_job(items=100_000, spot_check_rate=spot_check_rate)
    out = run(job, pods=[done(audited_shard, "car-a"), done(trusted_shard, "car-a")], cars=cars)
    assert out.ledger[trusted_shard].accepted == D1
    assert out.trust == []  # an unaudited result proves nothing about the car
    assert audited_shard not in out.ledger
    assert [c.replica for c in creates_of(out, audited_shard)] == [1]


def test_the_audit_decision_is_the_same_after_a_restart() -> None:
    cars = {**CARS, "car-a": CarView(owner="owner-a", valid_streak=20)}
    job = make_job(items=20_000, shard_size=10, spot_check_rate=0.0)
    pods = [done(i, "car-a") for i in range(200)]
    first = run(job, pods=pods, cars=cars)
    again = run(make_job(items=20_000, shard_size=10), pods=pods, cars=cars)  # a fresh process, same job uid
    assert first.ledger.keys() == again.ledger.keys()
    assert [c.shard for c in first.creates if c.replica == 1] == [c.shard for c in again.creates if c.replica == 1]
    assert audit_roll(UID, 7) == audit_roll(UID, 7) != audit_roll("another-job", 7)


@pytest.mark.parametrize("streak, spot_check_rate", [(20, 0.0), (40, 0.1), (100, 0.0)])
def test_over_many_shards_the_audit_rate_matches_the_probability(streak: int, spot_check_rate: float) -> None:
    n = 4000
    expected = max(spot_check_rate, 1.0 / streak)
    cars = {**CARS, "car-a": CarView(owner="owner-a", valid_streak=streak)}
    job = make_job(items=n, shard_size=1, spot_check_rate=spot_check_rate)
    out = run(job, pods=[done(i, "car-a", items_done=1) for i in range(n)], cars=cars)
    audits = {c.shard for c in out.creates if c.replica == 1}
    assert len(audits) + len(out.ledger) == n
    rate = len(audits) / n
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert abs(rate - expected) < 4 * sigma + 0.002, (rate, expected)


# ---- settled shards, completion ----------------------------------------------------------------------------------


def test_settled_shards_get_no_pods_their_leftovers_go_and_counts_come_from_the_ledger() -> None:
    ledger = {0: accepted(energy=0.4), 1: accepted(energy=0.1)}
    leftovers = [pod(0, 1, node="car-b"), done(1, "car-c"), pod(1, 1, phase="Gone", node="car-d", reason=GONE),
                 pod(0, 2, node="car-e", deleting=True)]
    out = run(make_job(parallelism=2), pods=leftovers, ledger=ledger)
    assert [c.shard for c in out.creates] == [2, 3]
    assert sorted(out.deletes) == ["job-0-1-0", "job-1-0-0"]
    assert out.ledger == {} and out.trust == []
    assert (out.counts.verified, out.counts.items_done) == (2, 20)
    assert out.counts.energy_kwh == pytest.approx(0.5)


def test_a_job_is_complete_when_every_shard_is_accepted() -> None:
    out = run(make_job(items=30), ledger={0: accepted(), 1: accepted()}, pods=[done(2, "car-t", items_done=10)],
              cars={**CARS, "car-t": CarView(owner="owner-t", valid_streak=10**9)})
    assert out.ledger[2].accepted == D1
    assert out.complete and out.failed is None
    assert (out.counts.verified, out.counts.pending, out.counts.items_done) == (3, 0, 30)
    assert not run(make_job(items=30), ledger={0: accepted(), 1: accepted()}).complete


def test_shards_beyond_the_job_lose_their_pods() -> None:
    out = run(make_job(items=20), pods=[pod(5), pod(6, phase="Gone", reason=GONE)])
    assert out.deletes == ["job-5-0-0"]
    assert out.counts.total == 2


# ---- deadline and budget ---------------------------------------------------------------------------------------


def test_past_the_deadline_the_job_fails_and_stops_its_pods() -> None:
    started = T0 - timedelta(seconds=601)
    out = run(make_job(deadline=600), pods=[pod(0), pod(1, node="car-b")], started_at=started)
    assert out.failed is not None and out.failed[0] == "DeadlineExceeded"
    assert out.creates == [] and set(out.deletes) == {"job-0-0-0", "job-1-0-0"}


def test_before_the_deadline_the_plan_looks_again_no_later_than_it() -> None:
    out = run(make_job(deadline=600), pods=[pod(0)], started_at=T0 - timedelta(seconds=590))
    assert out.failed is None
    assert out.requeue_after is not None and out.requeue_after <= 10.0


@pytest.mark.parametrize("budget, reason", [
    ({"maxEnergyKWh": 1.0}, "BudgetExceeded"),
    ({"maxCost": 0.5, "pricePerKWh": 0.5}, "BudgetExceeded"),  # 1.2 kWh x 0.5 = 0.60 > 0.50
    ({"maxEnergyKWh": 2.0, "maxCost": 1.0, "pricePerKWh": 0.5}, None),
])
def test_energy_or_cost_over_the_budget_fails_the_job(budget: dict[str, Any], reason: str | None) -> None:
    out = run(make_job(budget=budget), ledger={0: accepted(energy=0.7)}, pods=[pod(1, energy=0.5)])
    assert (out.failed[0] if out.failed else None) == reason
    if reason:
        assert out.creates == [] and "job-1-0-0" in out.deletes


# ---- counts ------------------------------------------------------------------------------------------------------


def test_counts_add_up_to_the_total() -> None:
    job = make_job(items=100, replicas=2, quorum=2, retries=5)
    pods = [
        pod(2, 0), pod(2, 1, node="car-b"),  # running
        done(3, "car-a"), pod(3, 1, node="car-b"),  # one result, one running: running
        done(4, "car-a"), pod(4, 1, phase="Pending", node=""),  # one result, the other waits: succeeded
        pod(5, 0, phase="Pending", node="", unschedulable="0/5 nodes are available"),
        pod(5, 1, phase="Pending", node=""),  # waiting: pending
        *failed_chain(6, 1),  # backing off: pending
    ]
    ledger = {0: accepted(), 1: LedgerEntry(failed="lost")}
    out = plan(inputs(job, pods=pods, ledger=ledger))
    c = out.counts
    assert (c.total, c.verified, c.failed, c.running, c.succeeded) == (10, 1, 1, 2, 1)
    assert c.pending == 5
    assert c.pending + c.running + c.succeeded + c.verified + c.failed == c.total


def test_items_done_includes_in_flight_progress_capped_per_shard() -> None:
    job = make_job(items=95)
    out = run(job, ledger={0: accepted()}, pods=[pod(1, items_done=4), pod(9, items_done=50)])
    assert out.counts.items_done == 10 + 4 + 5


def test_items_done_does_not_fall_back_when_a_car_departs() -> None:
    before = run(pods=[pod(0, items_done=8, checkpoint=ck(6))]).counts.items_done
    resumed = pod(0, attempt=1, phase="Pending", node="", resume=ck(6), report=False,
                  carried=Carried(0.0, 1, ("car-a",)))
    after = run(pods=[resumed]).counts.items_done
    assert (before, after) == (8, 6)


def test_energy_counts_every_attempt_once() -> None:
    """Replica 0: attempt 0 failed (0.1 kWh, kept), attempt 1 departed (0.2, its pod still being deleted),
    attempt 2 runs (0.3 so far, carrying attempt 1's 0.2). Replica 1 ran on its first car: 0.05.
    A settled shard cost 1.0."""
    pods = [
        pod(0, 0, 0, "Failed", reason="ModelError", energy=0.1, finished_at=T0 - timedelta(hours=1)),
        pod(0, 0, 1, "Failed", "car-b", reason="CarLeftParked", energy=0.2, deleting=True),
        pod(0, 0, 2, "Running", "car-c", energy=0.3, carried=Carried(0.2, 1, ("car-b",))),
        pod(0, 1, 0, "Running", "car-d", energy=0.05),
    ]
    out = run(make_job(replicas=2, quorum=2), pods=pods, ledger={1: accepted(energy=1.0)})
    assert out.counts.energy_kwh == pytest.approx(1.65)
    # The same energy is recorded when the shard is accepted.
    finished = [*pods[:2], replace(pods[2], phase="Succeeded", report=ShardReport(
        items_done=10, result_sha256=D1, energy_kwh=0.3)), replace(pods[3], phase="Succeeded", report=ShardReport(
            items_done=10, result_sha256=D1, energy_kwh=0.05))]
    accept = run(make_job(replicas=2, quorum=2), pods=finished)
    assert accept.ledger[0].energy_kwh == pytest.approx(0.65)


def test_departures_so_far_still_count_once_the_shard_resumed() -> None:
    resumed = pod(0, attempt=2, node="car-c", carried=Carried(0.1, 2, ("car-a", "car-b")))
    assert run(pods=[resumed]).counts.departures == 2


def test_the_schedulers_most_common_complaint_is_surfaced() -> None:
    taint = "0/3 nodes are available: 3 node(s) had untolerated taint {fleetlet.io/driving: }."
    pods = [pod(0, phase="Pending", node="", unschedulable=taint),
            pod(1, phase="Pending", node="", unschedulable=taint),
            pod(2, phase="Pending", node="", unschedulable="0/3 nodes are available: 3 Insufficient cpu."),
            pod(3, phase="Pending", node="", unschedulable="ignored: being deleted", deleting=True)]
    assert run(pods=pods).counts.unschedulable == taint
    assert run(pods=[pod(0)]).counts.unschedulable is None


# ---- purity ------------------------------------------------------------------------------------------------------


def test_the_same_inputs_give_the_same_plan() -> None:
    pods = [done(0, "car-a"), pod(1, phase="Failed", reason="CarLeftParked", checkpoint=ck(3)), *failed_chain(2, 2)]
    inp = inputs(make_job(replicas=1), pods=pods)
    assert plan(inp) == plan(inp)


# ---- the ledger's wire format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [
    LedgerEntry(),
    LedgerEntry(accepted=D1, energy_kwh=0.123456789, cars=("car-a", "car-b")),
    LedgerEntry(failed="OOMKilled: the shard failed (4 failures, retries: 3)", energy_kwh=2.5),
    LedgerEntry().with_resume(1, ResumePoint(ck(4), Carried(0.25, 2, ("car-a", "car-b")), 3))
                 .with_resume(0, ResumePoint(None, Carried(), 1)),
    LedgerEntry(accepted=D1, cars=("car-a",), attempts=4, reopened=2),
], ids=["empty", "accepted", "failed", "resume-points", "reopened"])
def test_ledger_entries_round_trip_through_their_wire_format(entry: LedgerEntry) -> None:
    wire = json.loads(json.dumps(entry.wire()))  # what a ConfigMap's JSON gives back
    assert LedgerEntry.parse(wire) == entry


def test_a_settled_entry_drops_its_resume_points_on_the_wire() -> None:
    point = ResumePoint(ck(5), Carried(0.1, 1, ("car-a",)), 1)
    entry = LedgerEntry(accepted=D1).with_resume(0, point)
    assert "r" not in entry.wire()
    assert LedgerEntry.parse(entry.wire()) == LedgerEntry(accepted=D1)


@pytest.mark.parametrize("carried", [Carried(), Carried(1.5, 3, ("car-a", "car-b", "car-c"))])
def test_carried_round_trips_through_its_annotation(carried: Carried) -> None:
    assert Carried.parse(carried.annotation()) == carried


@pytest.mark.parametrize("raw", [None, "", "not json", "[]", '{"e": "x"}'])
def test_a_damaged_carried_annotation_reads_as_nothing_carried(raw: str | None) -> None:
    assert Carried.parse(raw) == Carried()


@pytest.mark.parametrize("point", [ResumePoint(ck(9), Carried(0.5, 1, ("car-a",)), 2),
                                   ResumePoint(None, Carried(), 0)])
def test_resume_points_round_trip(point: ResumePoint) -> None:
    assert ResumePoint.parse(json.loads(json.dumps(point.wire()))) == point


def test_trust_verdicts_name_the_shard() -> None:
    out = run(make_job(replicas=2, quorum=2), pods=[done(4, "car-a"), done(4, "car-b", replica=1)])
    assert set(out.trust) == {TrustVerdict("car-a", True, True, 4), TrustVerdict("car-b", True, True, 4)}
