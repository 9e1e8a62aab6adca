"""The assignments a car holds, as a pure state machine: what each is doing and what the shim must be told.

What it is for: one place decides every assignment's lifecycle and its reports, testable without sockets,
sandboxes or an event loop. The agent feeds it what happens (the shim's ``assign``/``stop``/``ack``, fetch
and run progress, the safety reflex's trip, the owner's rules draining work) and reads back the ``PodStatus``
to report for each held assignment and the list the next ``hello`` carries.

Lifecycle (``Held.stage``)::

    accepted ─▶ fetching ─▶ running ─▶ succeeded
        │           │           │
        └───────────┴───────────┴────▶ failed        (refused, fetch failed, run failed, stopped,
                                                      tripped by the reflex, drained by the owner's rules)
    final (succeeded|failed) ─ack─▶ forgotten

A stop can be asked for at any stage before the end: by the shim (``stop``, graceful within its grace), by the
safety reflex (``trip``: the run was already killed) or by the owner's rules (``drain``: graceful, checkpoint
first). The first one decides the reason the assignment ends with, except that a trip always wins: it is
what really ended the work. A run that completes despite a stop request still succeeds (its result is good).

Delivery: every held assignment has a latest status; the agent sends it when it changes and again after
every welcome, and the assignment is forgotten only when the shim ``ack``s its final status. So what the shim
hears is never lost to a dropped link. ``version`` grows with every change and ``milestone`` with the changes
the shim must hear at once (stage, checkpoint, the end); progress alone may be rate-limited by the sender.

Inputs from the shim are idempotent: a second ``assign`` of a held uid is ignored; an ``ack`` of an assignment
that is not final is ignored (and logged); a ``stop`` of a final one is answered by its final status again; a
``stop`` of a uid the car does not hold (the assign was lost, or it was acked and forgotten) is answered with
a final ``Failed``/``UnknownAssignment`` status, so the shim never waits for an answer that cannot come.

What it must never do: do I/O, await, start or stop processes, or read the wall clock except through the
injected ``now``. It is not thread-safe: the agent calls it on its event loop only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from fleetlet.api.v1alpha1.shard import ShardAssignment, ShardCheckpoint
from fleetlet.carlink.protocol import Assign, ContainerState, Grant, HeldAssignment, PodStatus, Stop

log = logging.getLogger(__name__)

Stage = Literal["accepted", "fetching", "running", "succeeded", "failed"]
Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
StopKind = Literal["stop", "trip", "drain"]

MAX_LISTED = 64  # protocol.Hello.assignments max_length
EXIT_SIGTERM = 143  # 128 + SIGTERM: stopped gracefully, as a container runtime reports it
EXIT_SIGKILL = 137  # 128 + SIGKILL
UNKNOWN_ASSIGNMENT = "UnknownAssignment"
_PHASES: dict[Stage, Phase] = {
    "accepted": "Pending", "fetching": "Pending", "running": "Running", "succeeded": "Succeeded", "failed": "Failed",
}  # fmt: skip


@dataclass(frozen=True)
class StopRequest:
    """Why and how an assignment is to stop. ``reason`` is the pod status reason it ends with."""

    kind: StopKind
    reason: str
    detail: str  # what the message says about it (the shim's reason, the drive state, the owner's rule)
    grace_seconds: float = 30.0


@dataclass(frozen=True)
class RunEnd:
    """How a run ended, in the runner's own words (``reason`` is a sandbox reason: Completed, Stopped, ...)."""

    reason: str
    message: str
    exit_code: int | None
    signal: int | None
    items_done: int
    duration_seconds: float = 0.0


class StopAction(StrEnum):
    """What the agent must do about a ``stop``."""

    STOP_RUN = "stopRun"  # running: stop the run gracefully within the grace (now, if the grace is 0)
    CANCEL = "cancel"  # not running yet: cancel the fetch; it ends as stopped before it ran
    RESEND = "resend"  # already final: its final status is due again (marked changed)
    UNKNOWN = "unknown"  # not held: a final UnknownAssignment status was made for it


class AckResult(StrEnum):
    FORGOTTEN = "forgotten"
    NOT_FINAL = "notFinal"  # ignored: the car still works on it (a confused shim; logged)
    UNKNOWN = "unknown"  # ignored: nothing held under that uid (an ack sent twice)


@dataclass(eq=False)
class Held:
    """One held assignment. Read it; change it only through ``Assignments``."""

    uid: str
    order: int  # arrival order: newest work has the largest
    assign: Assign | None  # None for an UnknownAssignment answer to a stop
    stage: Stage = "accepted"
    items_done: int = 0
    checkpoint: ShardCheckpoint | None = None
    result_digest: str | None = None
    provider: str | None = None
    energy_kwh: float = 0.0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    reason: str | None = None
    message: str | None = None
    exit_code: int | None = None
    stop: StopRequest | None = None
    version: int = 0
    milestone: int = 0
    notes: list[str] = field(default_factory=list)  # why it ended, for the agent's log

    @property
    def phase(self) -> Phase:
        return _PHASES[self.stage]

    @property
    def final(self) -> bool:
        return self.stage in ("succeeded", "failed")

    @property
    def assignment(self) -> ShardAssignment | None:
        return self.assign.assignment if self.assign is not None else None

    @property
    def grant(self) -> Grant | None:
        return self.assign.grant if self.assign is not None else None


class Assignments:
    """The state machine of every assignment one car holds; see the module docstring."""

    def __init__(
        self,
        car: str,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_final: int = 1024,
    ) -> None:
        self.car = car
        self._now = now
        self._max_final = max_final
        self._held: dict[str, Held] = {}
        self._order = 0

    # ---- reading ------------------------------------------------------------------------------------------

    def get(self, uid: str) -> Held | None:
        return self._held.get(uid)

    def __contains__(self, uid: object) -> bool:
        return uid in self._held

    def __len__(self) -> int:
        return len(self._held)

    def held(self) -> list[Held]:
        """Everything not yet acked, newest work first."""
        return sorted(self._held.values(), key=lambda h: h.order, reverse=True)

    def active(self) -> list[Held]:
        """Assignments not yet final (accepted, fetching or running), newest first."""
        return [h for h in self.held() if not h.final]

    def hello(self) -> list[HeldAssignment]:
        """What the next hello lists: everything not yet acked, newest work first, at most 64."""
        return [_describe(h) for h in self.held()[:MAX_LISTED]]

    def describe(self, uid: str) -> HeldAssignment | None:
        h = self._held.get(uid)
        return _describe(h) if h is not None else None

    def status(self, uid: str) -> PodStatus:
        """The status to report for ``uid`` now (KeyError if not held)."""
        h = self._held[uid]
        if h.final:
            container = ContainerState(
                state="terminated", exit_code=h.exit_code, reason=h.reason, message=_clip(h.message),
                started_at=h.started_at, finished_at=h.finished_at,
            )  # fmt: skip
        elif h.stage == "running":
            container = ContainerState(state="running", started_at=h.started_at)
        else:
            what = "fetching the model and input by digest" if h.stage == "fetching" else "accepted"
            container = ContainerState(state="waiting", reason="ContainerCreating", message=what)
        return PodStatus(
            car=self.car,
            uid=h.uid,
            phase=h.phase,
            container=container,
            items_done=h.items_done,
            checkpoint=h.checkpoint,
            result_digest=h.result_digest,
            provider=h.provider,
            energy_kwh=min(max(h.energy_kwh, 0.0), 1000.0),
        )

    # ---- from the shim ------------------------------------------------------------------------------------

    def assign(self, msg: Assign) -> bool:
        """Hold a new assignment (True: start it). A uid already held is ignored (False): idempotent."""
        if msg.uid in self._held:
            return False
        self._order += 1
        h = Held(uid=msg.uid, order=self._order, assign=msg)
        resume = msg.assignment.resume_from
        if resume is not None:  # the point it resumes from is the checkpoint to report until a newer one
            h.checkpoint, h.items_done = resume, resume.items_done
        self._held[msg.uid] = h
        self._changed(h, milestone=True)
        return True

    def request_stop(self, msg: Stop) -> StopAction:
        """The shim asks to stop ``msg.uid`` (gracefully within ``msg.grace_seconds``)."""
        h = self._held.get(msg.uid)
        if h is None:
            self._order += 1
            h = Held(uid=msg.uid, order=self._order, assign=None)
            self._held[msg.uid] = h
            self._end(h, "failed", UNKNOWN_ASSIGNMENT,
                      f"car {self.car} holds no assignment {msg.uid} (never received, or finished and "
                      "acknowledged); nothing of it runs here", None)  # fmt: skip
            return StopAction.UNKNOWN
        if h.final:
            self._changed(h, milestone=True)
            return StopAction.RESEND
        if h.stop is None:
            h.stop = StopRequest("stop", "Stopped", msg.reason or "Stop", msg.grace_seconds)
            self._changed(h, milestone=False)
        return StopAction.STOP_RUN if h.stage == "running" else StopAction.CANCEL

    def ack(self, uid: str) -> AckResult:
        """The shim stored ``uid``'s final status (or the pod is gone): forget it if it is final."""
        h = self._held.get(uid)
        if h is None:
            return AckResult.UNKNOWN
        if not h.final:
            log.warning("car %s: ack for %s, which is still %s: ignored", self.car, uid, h.stage)
            return AckResult.NOT_FINAL
        del self._held[uid]
        return AckResult.FORGOTTEN

    # ---- from the car's own work --------------------------------------------------------------------------

    def fetching(self, uid: str) -> None:
        h = self._live(uid)
        if h is not None and h.stage == "accepted":
            h.stage = "fetching"
            self._changed(h, milestone=True)

    def started(self, uid: str, provider: str | None) -> None:
        """The run exists (its process is being created): Running, on ``provider``."""
        h = self._live(uid)
        if h is None:
            return
        h.stage, h.provider, h.started_at = "running", provider, self._now()
        self._changed(h, milestone=True)

    def ran_on(self, uid: str, provider: str) -> None:
        """The run reports the provider its session really uses (it may differ from the one planned)."""
        h = self._held.get(uid)
        if h is not None and h.provider != provider:
            h.provider = provider
            self._changed(h, milestone=not h.final)

    def progress(self, uid: str, items_done: int) -> None:
        h = self._live(uid)
        if h is not None and items_done != h.items_done:
            h.items_done = items_done
            self._changed(h, milestone=False)

    def checkpointed(self, uid: str, checkpoint: ShardCheckpoint) -> None:
        """A checkpoint is safely in the store: the work can resume from it, here or elsewhere."""
        h = self._held.get(uid)
        if h is None or (h.final and h.stage == "succeeded"):
            return
        if h.checkpoint is None or checkpoint.items_done >= h.checkpoint.items_done:
            h.checkpoint = checkpoint
            h.items_done = max(h.items_done, checkpoint.items_done)
            self._changed(h, milestone=True)

    def metered(self, uid: str, energy_kwh: float) -> None:
        """The work energy metered for ``uid`` so far (frozen once it is final)."""
        h = self._live(uid)
        if h is not None and energy_kwh != h.energy_kwh:
            h.energy_kwh = energy_kwh
            self._changed(h, milestone=False)

    def trip(self, uid: str, reason: str, detail: str) -> bool:
        """The safety reflex killed ``uid``'s run (or would have). True if it was live."""
        h = self._live(uid)
        if h is None:
            return False
        if h.stop is None or h.stop.kind != "trip":
            h.stop = StopRequest("trip", reason, detail, 0.0)
            self._changed(h, milestone=False)
        return True

    def drain(self, uid: str, reason: str, detail: str, grace_seconds: float) -> StopAction | None:
        """The owner's rules ask running work to stop gracefully (``reason``: a policy Reason word).

        Returns what the agent must do, or None when a stop is already under way (or it is final)."""
        h = self._live(uid)
        if h is None or h.stop is not None:
            return None
        h.stop = StopRequest("drain", reason, detail, grace_seconds)
        self._changed(h, milestone=False)
        return StopAction.STOP_RUN if h.stage == "running" else StopAction.CANCEL

    def refuse(self, uid: str, reason: str, message: str) -> None:
        """It ends before it ran: not admitted, not fetchable, not runnable here."""
        h = self._live(uid)
        if h is not None:
            self._end(h, "failed", reason, message, None)

    def abandon(self, uid: str) -> None:
        """It ends before it ran because a stop was asked for (the stop's reason is its reason)."""
        h = self._live(uid)
        if h is None:
            return
        stop = h.stop or StopRequest("stop", "Stopped", "Stop")
        self._end(h, "failed", stop.reason, f"stopped before it ran ({stop.detail})", None)

    def fail(self, uid: str, reason: str, message: str, exit_code: int | None = None) -> None:
        h = self._live(uid)
        if h is not None:
            self._end(h, "failed", reason, message, exit_code)

    def run_ended(self, uid: str, end: RunEnd, result_digest: str | None = None) -> None:
        """The run is over; ``result_digest`` is set when it completed and its result is in the store."""
        h = self._live(uid)
        if h is None:
            return
        h.items_done = max(h.items_done, end.items_done)
        if end.reason == "Completed":
            if result_digest is None:
                self._end(h, "failed", "Error", "the run completed but left no result to report", 0)
                return
            h.result_digest = result_digest
            self._end(h, "succeeded", "Completed", f"{h.items_done} items in {end.duration_seconds:.1f} s", 0)
            return
        resume = f"; resume from the checkpoint at {h.checkpoint.items_done} items" if h.checkpoint else ""
        stop = h.stop
        graceful = end.reason == "Stopped"
        how = "gracefully" if graceful else "by SIGKILL after its grace period"
        if stop is not None and stop.kind == "trip":
            self._end(h, "failed", stop.reason, f"the car's safety reflex killed the shard at once ({stop.detail}) "
                      f"after {h.items_done} items{resume}", EXIT_SIGKILL)  # fmt: skip
        elif stop is not None and stop.kind == "drain":
            self._end(h, "failed", stop.reason, f"the owner's rules stopped the shard {how} ({stop.detail}) after "
                      f"{h.items_done} items{resume}", EXIT_SIGTERM if graceful else EXIT_SIGKILL)  # fmt: skip
        elif stop is not None:
            self._end(h, "failed", stop.reason, f"stopped {how} ({stop.detail}) after {h.items_done} items{resume}",
                      EXIT_SIGTERM if graceful else EXIT_SIGKILL)  # fmt: skip
        else:
            exit_code = end.exit_code if end.exit_code is not None else 128 + (end.signal or 9)
            self._end(h, "failed", end.reason, f"{end.message}{resume}", exit_code)

    # ---- internals ----------------------------------------------------------------------------------------

    def _live(self, uid: str) -> Held | None:
        h = self._held.get(uid)
        return h if h is not None and not h.final else None

    def _changed(self, h: Held, *, milestone: bool) -> None:
        h.version += 1
        if milestone:
            h.milestone += 1

    def _end(self, h: Held, stage: Literal["succeeded", "failed"], reason: str, message: str,
             exit_code: int | None) -> None:  # fmt: skip
        h.stage, h.reason, h.message, h.exit_code = stage, reason, message, exit_code
        h.finished_at = self._now()
        self._changed(h, milestone=True)
        self._bound_finals()

    def _bound_finals(self) -> None:
        # A shim that never acks must not grow the car's memory without bound: the oldest finals go first.
        finals = [h for h in self._held.values() if h.final]
        for h in sorted(finals, key=lambda h: h.order)[: max(0, len(finals) - self._max_final)]:
            log.warning("car %s: forgetting %s's final status unacknowledged (over %d held)",
                        self.car, h.uid, self._max_final)  # fmt: skip
            del self._held[h.uid]


def _describe(h: Held) -> HeldAssignment:
    return HeldAssignment(uid=h.uid, phase=h.phase, items_done=h.items_done, checkpoint=h.checkpoint,
                          result_digest=h.result_digest)  # fmt: skip


def _clip(text: str | None) -> str | None:
    return text[:1024] if text else None
