"""The car's assignment state machine, without sockets or sandboxes: what the shim hears at each step.

What a user relies on: every assignment ends with exactly one final status whose reason says what happened (it
completed, it was stopped, the car drove off, the owner's rules drained it, it could not run); the checkpoint it
can resume from is in every later status; the hello lists what the car holds, newest first, at most 64; the
shim's messages are idempotent (a second assign, an ack of unfinished work, a stop of finished work); a stop of
work the car does not hold is still answered, so the shim never waits forever; an ack is what lets the car forget.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fleetlet_car.assignments import (
    MAX_LISTED,
    UNKNOWN_ASSIGNMENT,
    AckResult,
    Assignments,
    RunEnd,
    StopAction,
)

from fleetlet.api.v1alpha1.shard import ShardAssignment, ShardCheckpoint, ShardInput, ShardModel
from fleetlet.carlink.protocol import Assign, Grant, Stop

CAR = "car-000001"
T0 = datetime(2025, 6, 2, 22, 0, tzinfo=UTC)
CKPT = ShardCheckpoint(sha256="c" * 64, items_done=400)


def assign(uid: str, *, resume: ShardCheckpoint | None = None) -> Assign:
    return Assign(
        uid=uid, namespace="jobs", name=f"shard-{uid}",
        assignment=ShardAssignment(model=ShardModel(sha256="a" * 64), input=ShardInput(sha256="b" * 64, end=1000),
                                   resume_from=resume),
        grant=Grant(token="secret", base_url="https://store.example/"),
    )  # fmt: skip


@pytest.fixture
def machine() -> Assignments:
    return Assignments(CAR, now=lambda: T0)


def running(m: Assignments, uid: str = "u1") -> Assignments:
    assert m.assign(assign(uid))
    m.fetching(uid)
    m.started(uid, "CPUExecutionProvider")
    return m


def ended(reason: str, *, items: int = 500, exit_code: int | None = None, signal: int | None = None) -> RunEnd:
    return RunEnd(reason=reason, message=f"the runner said {reason}", exit_code=exit_code, signal=signal,
                  items_done=items, duration_seconds=2.5)  # fmt: skip


def test_a_new_assignment_is_pending_while_it_fetches_then_running_on_its_provider(machine: Assignments) -> None:
    assert machine.assign(assign("u1"))
    accepted = machine.status("u1")
    assert (accepted.phase, accepted.container.state, accepted.container.reason) == (
        "Pending", "waiting", "ContainerCreating")  # fmt: skip
    machine.fetching("u1")
    assert "fetching" in (machine.status("u1").container.message or "")
    machine.started("u1", "CPUExecutionProvider")
    status = machine.status("u1")
    assert (status.phase, status.container.state, status.provider) == ("Running", "running", "CPUExecutionProvider")
    assert status.container.started_at == T0 and status.car == CAR
    machine.progress("u1", 250)
    machine.metered("u1", 0.004)
    status = machine.status("u1")
    assert (status.items_done, status.energy_kwh) == (250, 0.004)


# How runs end: (stop asked for, how the run ended) -> (phase, reason, exit code, words in the message).
ENDINGS = [
    (None, ended("Completed", items=1000, exit_code=0), ("Succeeded", "Completed", 0, "1000 items in 2.5 s")),
    (None, ended("OOMKilled", exit_code=14), ("Failed", "OOMKilled", 14, "the runner said OOMKilled")),
    (None, ended("Killed", signal=9), ("Failed", "Killed", 137, "resume from the checkpoint at 400")),
    ("stop", ended("Stopped", exit_code=3), ("Failed", "Stopped", 143, "stopped gracefully (PodDeleted)")),
    ("stop", ended("Killed", signal=9), ("Failed", "Stopped", 137, "by SIGKILL after its grace period")),
    ("trip", ended("Killed", signal=9), ("Failed", "CarLeftParked", 137, "safety reflex killed the shard at once")),
    ("drain", ended("Stopped", exit_code=3), ("Failed", "PausedByOwner", 143, "the owner's rules stopped the shard")),
    ("stop", ended("Completed", items=1000, exit_code=0), ("Succeeded", "Completed", 0, "1000 items")),
]


@pytest.mark.parametrize(("stop", "end", "expected"), ENDINGS)
def test_how_a_run_ends_decides_its_final_status(
    machine: Assignments, stop: str | None, end: RunEnd, expected: tuple[str, str, int, str]
) -> None:
    running(machine)
    machine.checkpointed("u1", CKPT)
    if stop == "stop":
        assert machine.request_stop(Stop(uid="u1", grace_seconds=10, reason="PodDeleted")) is StopAction.STOP_RUN
    elif stop == "trip":
        assert machine.trip("u1", "CarLeftParked", "CarLeftParked, drive state Driving")
    elif stop == "drain":
        assert machine.drain("u1", "PausedByOwner", "the owner paused the car", 30.0) is StopAction.STOP_RUN
    machine.run_ended("u1", end, "d" * 64 if end.reason == "Completed" else None)

    status = machine.status("u1")
    phase, reason, exit_code, words = expected
    assert (status.phase, status.container.state) == (phase, "terminated")
    assert (status.container.reason, status.container.exit_code) == (reason, exit_code)
    assert words in (status.container.message or "")
    assert status.checkpoint == CKPT and status.provider == "CPUExecutionProvider"
    assert status.container.finished_at == T0
    assert (status.result_digest is not None) == (phase == "Succeeded")


def test_a_trip_wins_over_a_stop_asked_for_earlier(machine: Assignments) -> None:
    running(machine)
    machine.request_stop(Stop(uid="u1", grace_seconds=30))
    machine.trip("u1", "BatteryCritical", "BatteryCritical, charge 18%")
    machine.run_ended("u1", ended("Killed", signal=9))
    assert machine.status("u1").container.reason == "BatteryCritical"


@pytest.mark.parametrize(
    ("how", "reason"), [("refuse", "CarNotParked"), ("stop", "Stopped"), ("drain", "OutsideAvailabilityWindow")]
)
def test_work_that_never_ran_ends_with_its_reason(machine: Assignments, how: str, reason: str) -> None:
    machine.assign(assign("u1"))
    machine.fetching("u1")
    if how == "refuse":
        machine.refuse("u1", "CarNotParked", "the car cannot take work now (NotParked)")
    elif how == "stop":
        assert machine.request_stop(Stop(uid="u1", reason="PodDeleted")) is StopAction.CANCEL
        machine.abandon("u1")
    else:
        assert machine.drain("u1", "OutsideAvailabilityWindow", "outside the hours", 30) is StopAction.CANCEL
        machine.abandon("u1")
    status = machine.status("u1")
    assert (status.phase, status.container.reason, status.provider) == ("Failed", reason, None)
    assert machine.get("u1") is not None and machine.get("u1").final  # type: ignore[union-attr]


def test_a_resumed_assignment_reports_the_checkpoint_it_resumes_from(machine: Assignments) -> None:
    machine.assign(assign("u1", resume=CKPT))
    status = machine.status("u1")
    assert status.checkpoint == CKPT and status.items_done == 400
    older = ShardCheckpoint(sha256="e" * 64, items_done=100)
    machine.checkpointed("u1", older)  # never goes back to an older one
    assert machine.status("u1").checkpoint == CKPT


def test_a_second_assign_of_a_held_uid_is_ignored(machine: Assignments) -> None:
    running(machine)
    machine.progress("u1", 300)
    assert not machine.assign(assign("u1"))
    assert machine.status("u1").phase == "Running" and machine.status("u1").items_done == 300
    machine.run_ended("u1", ended("Completed", items=1000, exit_code=0), "d" * 64)
    assert not machine.assign(assign("u1"))  # finished, not yet acked: still held, still not run again
    assert machine.status("u1").phase == "Succeeded" and len(machine) == 1


def test_an_ack_forgets_only_final_assignments(machine: Assignments) -> None:
    running(machine)
    assert machine.ack("u1") is AckResult.NOT_FINAL
    assert machine.status("u1").phase == "Running"
    machine.run_ended("u1", ended("Completed", items=1000, exit_code=0), "d" * 64)
    assert machine.ack("u1") is AckResult.FORGOTTEN
    assert "u1" not in machine and machine.describe("u1") is None and machine.hello() == []
    assert machine.ack("u1") is AckResult.UNKNOWN  # an ack sent twice


def test_a_stop_of_work_the_car_does_not_hold_is_answered_with_a_final_status(machine: Assignments) -> None:
    assert machine.request_stop(Stop(uid="lost", grace_seconds=30, reason="PodDeleted")) is StopAction.UNKNOWN
    status = machine.status("lost")
    assert (status.phase, status.container.reason) == ("Failed", UNKNOWN_ASSIGNMENT)
    assert "holds no assignment lost" in (status.container.message or "")
    assert [a.uid for a in machine.hello()] == ["lost"]  # held (and re-sent) until the shim acks the answer
    assert machine.ack("lost") is AckResult.FORGOTTEN


def test_a_stop_of_finished_work_sends_its_final_status_again(machine: Assignments) -> None:
    running(machine)
    machine.run_ended("u1", ended("Completed", items=1000, exit_code=0), "d" * 64)
    before = machine.get("u1").milestone  # type: ignore[union-attr]
    assert machine.request_stop(Stop(uid="u1")) is StopAction.RESEND
    assert machine.get("u1").milestone > before  # type: ignore[union-attr]
    assert machine.status("u1").phase == "Succeeded"


def test_nothing_changes_a_final_status(machine: Assignments) -> None:
    running(machine)
    machine.run_ended("u1", ended("Stopped", exit_code=3))
    final = machine.status("u1")
    machine.progress("u1", 999)
    machine.metered("u1", 9.0)
    machine.trip("u1", "CarLeftParked", "late")
    machine.run_ended("u1", ended("Completed", exit_code=0), "d" * 64)
    assert machine.status("u1") == final


def test_the_hello_lists_held_work_newest_first_and_at_most_64(machine: Assignments) -> None:
    for i in range(70):
        machine.assign(assign(f"u{i:02d}"))
    running(machine, "u70")
    machine.checkpointed("u70", CKPT)
    hello = machine.hello()
    assert len(hello) == MAX_LISTED
    assert [a.uid for a in hello[:3]] == ["u70", "u69", "u68"]
    assert (hello[0].phase, hello[0].checkpoint, hello[0].items_done) == ("Running", CKPT, 400)
    assert all(a.phase == "Pending" for a in hello[1:])


def test_milestones_mark_what_the_shim_must_hear_at_once(machine: Assignments) -> None:
    running(machine)
    held = machine.get("u1")
    assert held is not None
    milestone, version = held.milestone, held.version
    machine.progress("u1", 10)
    machine.metered("u1", 0.001)
    assert held.milestone == milestone and held.version == version + 2  # progress alone may wait
    machine.checkpointed("u1", CKPT)
    assert held.milestone == milestone + 1


def test_finals_the_shim_never_acks_are_bounded() -> None:
    machine = Assignments(CAR, now=lambda: T0, max_final=3)
    for i in range(5):
        machine.assign(assign(f"u{i}"))
        machine.refuse(f"u{i}", "CarNotParked", "driving")
    assert [h.uid for h in machine.held()] == ["u4", "u3", "u2"]
