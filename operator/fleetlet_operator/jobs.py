"""The FleetJob controller: one idempotent ``sync(job)`` that carries a job from admission to a merged result.

Each sync gathers what the API holds (the job from kopf's watch, its shard pods from the pod informer, its
ledger, the cars' trust records), asks the pure planner (``reconcile.shards.plan``) what to do, and carries it
out in an order that keeps every crash safe: trust verdicts, then ledger writes, then pod creations, then pod
deletions, then (when every shard is accepted) the merge, then **one** status write — only if the status
changed. Events go to the FleetJob for what a person must know (admission problems, shards that fail for good,
rejected results, phase changes), not for every pod.

A job is admitted once per spec: the model and input are resolved in the artifact store and the input's item
count checked; a problem fails the job at once with a reason that says what to fix (it is not retried until the
spec changes). A deleted job stops its pods before its finalizer is released: nothing is left running on a car.

No timers per job: a sync returns when it wants to look again (a backoff, the deadline, a periodic resync) and
the work queue holds it. Blocking work (hashing, splitting, comparing, merging arrays) runs in threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleetlet.api.v1alpha1 import FleetJob
from fleetlet.api.v1alpha1.fleetjob import Result
from fleetlet.api.v1alpha1.shard import ANNOTATION, ShardCheckpoint, ShardReport
from fleetlet.kube import Change, Controller, GiveUp, Informer, Requeue, Retry
from fleetlet.kube.client import ApiError
from fleetlet.kube.events import EventRecorder, ObjectRef

from .artifacts import ArtifactProblem, JobArtifacts
from .kube import OperatorApi
from .ledger import Ledger
from .metrics import OperatorMetrics
from .reconcile import podspec
from .reconcile.model import (
    ANNOTATION_CARRIED,
    LABEL_ATTEMPT,
    LABEL_JOB_UID,
    LABEL_REPLICA,
    LABEL_SHARD,
    Carried,
    Plan,
    PodCreate,
    PodView,
    TrustVerdict,
)
from .reconcile.shards import JobInputs, plan
from .reconcile.status import next_status, rejected
from .settings import OperatorSettings
from .vehicles import VehicleController

log = logging.getLogger(__name__)
FINALIZER = "fleetlet.io/shards"
TERMINAL = ("Succeeded", "Failed")



@dataclass
class _Job:
    """What the controller remembers of one job between syncs (all of it recoverable from the API)."""

    uid: str
    key: str
    generation: int = 0
    model: str | None = None
    input: str | None = None
    total_shards: int = 0
    ledger: Ledger | None = None
    tombstones: dict[tuple[int, int, int], PodView] = field(default_factory=dict)
    classes: dict[int, tuple[frozenset[str], list[list[str]]]] = field(default_factory=dict)
    checked: dict[str, str | None] = field(default_factory=dict)  # result digest -> why it is invalid, or None
    judged: set[str] = field(default_factory=set)  # pods whose invalid result already cost their car trust
    last_status: dict[str, Any] | None = None
    priority_ready: bool = False


class JobController:
    def __init__(self, api: OperatorApi, artifacts: JobArtifacts, pods: Informer, vehicles: VehicleController,
                 settings: OperatorSettings, metrics: OperatorMetrics, events: EventRecorder) -> None:
        self.api = api
        self.artifacts = artifacts
        self.pods = pods
        self.vehicles = vehicles
        self.settings = settings
        self.metrics = metrics
        self.events = events
        self.jobs: dict[str, dict[str, Any]] = {}  # key -> the latest body kopf delivered
        self._state: dict[str, _Job] = {}  # uid -> state
        self._key_of: dict[str, str] = {}  # uid -> key
        pods.add_index("job", lambda p: [(p["metadata"].get("labels") or {}).get(LABEL_JOB_UID, "")])
        pods.add_handler(self._pod_changed)
        self.controller = Controller("fleetjobs", self.sync, workers=settings.job_workers, observer=metrics,
                                     sync_timeout_s=600.0)

    # ---- hand-offs -----------------------------------------------------------------------------------------

    def observe(self, event: dict[str, Any]) -> None:
        """A FleetJob event from kopf's watch (the handler's one-line hand-off)."""
        body = dict(event["object"])
        meta = body.get("metadata", {})
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        if event.get("type") == "DELETED":
            self.jobs.pop(key, None)
            uid = meta.get("uid", "")
            self._state.pop(uid, None)
            self._key_of.pop(uid, None)
        else:
            self.jobs[key] = body
            self._key_of[meta.get("uid", "")] = key
        self.controller.enqueue(key)

    def car_lost_trust(self, car: str) -> None:
        """Re-plan every live job at once: results that rest on ``car`` alone are withdrawn before a merge."""
        for key, body in list(self.jobs.items()):
            if (body.get("status") or {}).get("phase") not in TERMINAL:
                self.controller.enqueue(key)

    def _pod_changed(self, change: Change) -> None:
        labels = change.obj["metadata"].get("labels") or {}
        uid = labels.get(LABEL_JOB_UID, "")
        key = self._key_of.get(uid)
        if key is None:
            return
        if change.type == "DELETED":
            state = self._state.get(uid)
            view = _view(change.obj, gone=True)
            if state is not None and view is not None:
                state.tombstones[(view.shard, view.replica, view.attempt)] = view
        self.controller.enqueue(key)

    # ---- sync ----------------------------------------------------------------------------------------------

    async def sync(self, key: str) -> Requeue | None:
        body = self.jobs.get(key)
        if body is None:
            return None
        now = datetime.now(UTC)
        try:
            job = FleetJob.model_validate(body)
        except ValueError as exc:
            raise GiveUp(f"the FleetJob does not parse: {exc}") from exc
        meta = job.metadata
        assert meta.uid and meta.name and meta.namespace
        state = self._state.get(meta.uid)
        if state is None or state.generation != (meta.generation or 0):
            old = state
            state = self._state[meta.uid] = _Job(uid=meta.uid, key=key, generation=meta.generation or 0)
            if old is not None:  # the spec changed: admit again, keep what is durable anyway
                state.ledger, state.tombstones, state.checked = old.ledger, old.tombstones, old.checked
                state.judged = old.judged
        if body["metadata"].get("deletionTimestamp"):
            return await self._finalize(job, body)
        finalizers = list(body["metadata"].get("finalizers") or [])
        if FINALIZER not in finalizers:
            try:
                await self.api.set_job_finalizers(meta.namespace, meta.name, [*finalizers, FINALIZER],
                                                  body["metadata"]["resourceVersion"])
            except ApiError as exc:
                if exc.conflict:
                    raise Retry("the FleetJob changed meanwhile", delay=0.2) from exc
                raise
        status = job.status
        if status is not None and status.phase in TERMINAL and status.observed_generation == meta.generation:
            await self._delete(meta.namespace, [p["metadata"]["name"] for p in self._pods_of(meta.uid)
                                                if p["status"].get("phase") not in TERMINAL])
            return None
        if state.input is None:
            problem = await self._admit(job, state)
            if problem is not None:
                await self._write_status(job, state, rejected(job, problem.reason, problem.message, now))
                self._event(job, "Warning", problem.reason, problem.message)
                return None
        if state.ledger is None:
            state.ledger = await Ledger.load(self.api, meta.namespace, meta.name, meta.uid)
        cls = podspec.priority_class(job.spec.priority)
        if cls is not None and not state.priority_ready:
            await self.api.ensure_priority_class(cls, job.spec.priority)
            state.priority_ready = True
        started_at = status.start_time if status is not None and status.start_time else now
        views, invalid = await self._views(job, state)
        inputs = JobInputs(job=job, total_shards=state.total_shards, pods=views, ledger=state.ledger.entries,
                           cars=self.vehicles.cars(), classes={s: c for s, (_, c) in state.classes.items()},
                           started_at=started_at, now=now, settings=self.settings.plan)
        decided = await self._plan(inputs)
        if decided.compare:
            await self._classify(job, state, views, decided.compare)
            inputs = JobInputs(job=job, total_shards=state.total_shards, pods=views, ledger=state.ledger.entries,
                               cars=self.vehicles.cars(), classes={s: c for s, (_, c) in state.classes.items()},
                               started_at=started_at, now=now, settings=self.settings.plan)
            decided = await self._plan(inputs)
        decided.trust += invalid
        await self._carry_out(job, state, views, decided, now)
        held = decided.complete and self.vehicles.judging(
            car for entry in state.ledger.entries.values() for car in entry.cars)
        if held:  # a car of this job was just caught: its other results here may be withdrawn before the merge
            decided.complete = False
        result = await self._merge(job, state) if decided.complete else None
        await self._write_status(job, state, next_status(job, decided, total_shards=state.total_shards, now=now,
                                                         started_at=started_at, result=result))
        self._forget_tombstones(state, views)
        if decided.more:
            return Requeue(after=0.0)
        if held:
            return Requeue(after=1.0)
        if decided.complete or decided.failed is not None:
            return None
        return Requeue(after=decided.requeue_after or self.settings.plan.resync_s)

    async def _plan(self, inputs: JobInputs) -> Plan:
        """The pure planner; a job of many shards is planned in a thread so the event loop keeps serving (its
        inputs belong to this job's sync alone: the work queue never runs one key twice at once)."""
        if inputs.total_shards > 2000:
            return await asyncio.to_thread(plan, inputs)
        return plan(inputs)

    async def _admit(self, job: FleetJob, state: _Job) -> ArtifactProblem | None:
        spec = job.spec
        try:
            model = await asyncio.to_thread(self.artifacts.resolve, spec.model.uri, spec.model.sha256)
            data = await asyncio.to_thread(self.artifacts.resolve, spec.input.uri, spec.input.sha256)
            info = await asyncio.to_thread(self.artifacts.describe_input, data, spec.input.format)
        except ArtifactProblem as problem:
            return problem
        if info.items != spec.input.items:
            return ArtifactProblem("InputItemsMismatch",
                                   f"spec.input.items is {spec.input.items} but the input holds {info.items} items; "
                                   "fix spec.input.items")
        state.model, state.input = model, data
        state.total_shards = math.ceil(spec.input.items / spec.shard_size)
        log.info("job %s admitted: %d shards of up to %d items", state.key, state.total_shards, spec.shard_size)
        return None

    # ---- what the API holds --------------------------------------------------------------------------------

    def _pods_of(self, uid: str) -> list[dict[str, Any]]:
        return [p for k in self.pods.by_index("job", uid) if (p := self.pods.get(k)) is not None]

    async def _views(self, job: FleetJob, state: _Job) -> tuple[dict[int, list[PodView]], list[TrustVerdict]]:
        """The job's pods (and tombstones) by shard. A result that is not a valid result of its shard (wrong
        item count, malformed, a shape unlike the others) turns its pod into a failure and its car's verdict
        into invalid: a car's garbage is caught here, never at merge time."""
        views: dict[int, list[PodView]] = {}
        present: set[tuple[int, int, int]] = set()
        for pod in self._pods_of(state.uid):
            view = _view(pod)
            if view is None:
                continue
            present.add((view.shard, view.replica, view.attempt))
            views.setdefault(view.shard, []).append(view)
        for ident, tomb in state.tombstones.items():
            if ident not in present:
                views.setdefault(tomb.shard, []).append(tomb)
        invalid: list[TrustVerdict] = []
        for shard, pods in views.items():
            for n, view in enumerate(pods):
                if view.phase != "Succeeded":
                    continue
                digest = view.report.result_sha256 if view.report else None
                if digest is None:  # "done" without a result: nothing to verify, the shard must run again
                    pods[n] = _failed(view, "NoResult", "the car reported success without a result digest")
                    continue
                if digest not in state.checked:
                    state.checked[digest] = await self._check_result(job, shard, digest, state)
                why = state.checked[digest]
                if why is not None:
                    pods[n] = _failed(view, "ResultInvalid", why)
                    if view.node and view.name not in state.judged:
                        state.judged.add(view.name)
                        invalid.append(TrustVerdict(view.node, False, True, shard))
        return views, invalid

    async def _check_result(self, job: FleetJob, shard: int, digest: str, state: _Job) -> str | None:
        spec = job.spec
        expected = max(0, min(spec.shard_size, spec.input.items - shard * spec.shard_size))
        try:
            info = await asyncio.to_thread(self.artifacts.result_info, digest)
        except ArtifactProblem as problem:
            return problem.message
        if info.items != expected:
            return f"the result holds {info.items} items, the shard has {expected}"
        return None

    async def _classify(self, job: FleetJob, state: _Job, views: dict[int, list[PodView]], shards: list[int]) -> None:
        tolerance = job.spec.verification.tolerance
        for shard in shards:
            digests = [p.report.result_sha256 for p in views.get(shard, ())
                       if p.phase == "Succeeded" and p.report and p.report.result_sha256]
            key = frozenset(d for d in digests if d)
            known = state.classes.get(shard)
            if known is not None and known[0] == key:
                continue
            classes = await asyncio.to_thread(self.artifacts.classes, sorted(key), tolerance)
            state.classes[shard] = (key, [list(dict.fromkeys(c.digests)) for c in classes if c.valid]
                                    + [[d] for c in classes if not c.valid for d in dict.fromkeys(c.digests)])

    # ---- carrying out the plan -----------------------------------------------------------------------------

    async def _carry_out(self, job: FleetJob, state: _Job, views: dict[int, list[PodView]], decided: Plan,
                         now: datetime) -> None:
        meta = job.metadata
        assert meta.namespace and meta.name and state.ledger is not None
        if decided.ledger:
            owner = {"apiVersion": job.api_version, "kind": job.kind, "name": meta.name, "uid": meta.uid,
                     "controller": True, "blockOwnerDeletion": True}
            before = {s: e for s, e in state.ledger.entries.items() if s in decided.ledger}
            self.metrics.ledger_writes.inc(await state.ledger.write(self.api, decided.ledger, owner))
            self.metrics.withdrawn.inc(len(decided.reopened))
            for shard, entry in decided.ledger.items():
                if entry.accepted and not (before.get(shard) and before[shard].accepted):
                    first = min((p.created_at for p in views.get(shard, ())), default=now)
                    self.metrics.shard_seconds.observe(max(0.0, (now - first).total_seconds()))
        # Verdicts after the ledger: a shard's verdicts come with its acceptance, which the ledger now records, so
        # a sync retried after a failed ledger write does not judge the same cars twice (at most once, not twice).
        if decided.trust:
            self.vehicles.record(decided.trust)
        for ev in decided.events:
            self._event(job, ev.type, ev.reason, ev.message)
        if decided.creates:
            await self._create(job, state, decided.creates)
        await self._delete(meta.namespace, decided.deletes)
        if decided.force_deletes:
            await self._delete(meta.namespace, decided.force_deletes, grace_period_s=0)

    async def _create(self, job: FleetJob, state: _Job, creates: list[PodCreate]) -> None:
        spec = job.spec
        assert state.model is not None and state.input is not None
        gate = asyncio.Semaphore(self.settings.create_concurrency)
        replicated = spec.verification.replicas > 1

        async def one(c: PodCreate) -> None:
            async with gate:
                start = c.shard * spec.shard_size
                items = min(spec.shard_size, spec.input.items - start)
                assert state.input is not None and state.model is not None
                shard_input = await asyncio.to_thread(self.artifacts.shard_input, state.input, spec.input.format,
                                                      start, start + items)
                body = podspec.shard_pod(job, c, model_digest=state.model, input_digest=shard_input, items=items,
                                         unreachable_toleration_s=self.settings.unreachable_toleration_s,
                                         anti_affinity=replicated or c.replica > 0)
                if await self.api.create_pod(body):
                    self.metrics.pods_created.inc()
                    if c.cause == "failure":
                        self.metrics.retries.inc()
                    elif c.cause == "departure":
                        self.metrics.departures.inc()
                    if c.replica >= spec.verification.replicas and spec.verification.replicas == 1:
                        self.metrics.audits.inc()

        results = await asyncio.gather(*(one(c) for c in creates), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise Retry(f"{len(errors)} of {len(creates)} shard pods were not created: {errors[0]}")

    async def _delete(self, namespace: str, names: list[str], grace_period_s: int | None = None) -> None:
        gate = asyncio.Semaphore(self.settings.create_concurrency)

        async def one(name: str) -> None:
            async with gate:
                await self.api.delete_pod(namespace, name, grace_period_s)
                self.metrics.pods_deleted.inc()

        results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise Retry(f"{len(errors)} shard pods were not deleted: {errors[0]}")

    async def _merge(self, job: FleetJob, state: _Job) -> Result:
        assert state.ledger is not None
        digests = [state.ledger.entries[i].accepted for i in range(state.total_shards)]
        ordered = [d for d in digests if d]
        try:
            merged = await asyncio.to_thread(self.artifacts.merge, ordered, job.spec.input.items)
        except ArtifactProblem as problem:
            raise GiveUp(f"the accepted results cannot be merged: {problem.message}") from problem
        return Result(uri=f"fleetlet://sha256/{merged}", sha256=merged)

    async def _write_status(self, job: FleetJob, state: _Job, status: Any) -> None:
        meta = job.metadata
        assert meta.namespace and meta.name
        wire = status.wire()
        if wire == state.last_status:
            return
        current = job.status.wire() if job.status is not None else None
        if current == wire:
            state.last_status = wire
            return
        try:
            await self.api.patch_job_status(meta.namespace, meta.name, wire)
        except ApiError as exc:
            if exc.not_found:
                return
            raise
        self.metrics.status_writes.inc()
        old_phase = job.status.phase if job.status is not None else None
        if wire.get("phase") != old_phase:
            self._phase_event(job, old_phase, wire)
        state.last_status = wire

    def _event(self, job: FleetJob, type_: str, reason: str, message: str) -> None:
        meta = job.metadata
        assert meta.name
        self.events.record(ObjectRef("FleetJob", meta.name, job.api_version, meta.namespace, meta.uid),
                           type_, reason, message)

    def _phase_event(self, job: FleetJob, old: str | None, status: dict[str, Any]) -> None:
        phase = status.get("phase")
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        if phase == "Succeeded":
            self._event(job, "Normal", "Succeeded", conditions.get("Complete", {}).get("message", "done"))
        elif phase == "Failed":
            failed = conditions.get("Failed", {})
            self._event(job, "Warning", failed.get("reason", "Failed"), failed.get("message", "failed"))
        elif phase == "Suspended":
            self._event(job, "Normal", "Suspended", "spec.suspend is true: shards stop at a checkpoint")
        elif phase == "Running" and old in (None, "Pending", "Suspended"):
            self._event(job, "Normal", "Running" if old != "Suspended" else "Resumed",
                            conditions.get("Progressing", {}).get("message", "shards are running"))

    def _forget_tombstones(self, state: _Job, views: dict[int, list[PodView]]) -> None:
        if not state.tombstones:
            return
        newest: dict[tuple[int, int], int] = {}
        for pods in views.values():
            for p in pods:
                if p.phase != "Gone":
                    newest[(p.shard, p.replica)] = max(newest.get((p.shard, p.replica), -1), p.attempt)
        settled = state.ledger.entries if state.ledger is not None else {}
        for ident in list(state.tombstones):
            shard, replica, attempt = ident
            entry = settled.get(shard)
            if (entry is not None and entry.settled) or newest.get((shard, replica), -1) > attempt:
                del state.tombstones[ident]

    async def _finalize(self, job: FleetJob, body: dict[str, Any]) -> Requeue | None:
        meta = job.metadata
        assert meta.namespace and meta.name and meta.uid
        finalizers = list(body["metadata"].get("finalizers") or [])
        if FINALIZER not in finalizers:
            return None
        pods = self._pods_of(meta.uid)
        await self._delete(meta.namespace, [p["metadata"]["name"] for p in pods
                                            if not p["metadata"].get("deletionTimestamp")])
        if pods:
            return Requeue(after=2.0)  # the cars stop their shards; look again shortly
        try:
            await self.api.set_job_finalizers(meta.namespace, meta.name, [f for f in finalizers if f != FINALIZER],
                                              body["metadata"]["resourceVersion"])
        except ApiError as exc:
            if exc.not_found:
                return None
            if exc.conflict:
                raise Retry("the FleetJob changed meanwhile", delay=0.2) from exc
            raise
        log.info("job %s deleted: its shard pods are gone", self._key_of.get(meta.uid, meta.name))
        return None


def _view(pod: dict[str, Any], gone: bool = False) -> PodView | None:
    meta, status = pod["metadata"], pod.get("status") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    try:
        shard, replica, attempt = int(labels[LABEL_SHARD]), int(labels[LABEL_REPLICA]), int(labels[LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return None  # not a shard pod of ours (someone else's pod with our label)
    phase = status.get("phase") or "Pending"
    if gone and phase not in TERMINAL:
        phase = "Gone"
    resume = None
    try:
        body = json.loads(annotations.get(ANNOTATION) or "{}")
        if body.get("resumeFrom"):
            resume = ShardCheckpoint.model_validate(body["resumeFrom"])
    except ValueError:
        pass
    terminated = next((s.get("state", {}).get("terminated") for s in status.get("containerStatuses") or []
                       if s.get("state", {}).get("terminated")), None)
    scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    unschedulable = scheduled.get("message") if scheduled and scheduled.get("reason") == "Unschedulable" else None
    return PodView(
        name=meta["name"], shard=shard, replica=replica, attempt=attempt, phase=phase,
        node=pod.get("spec", {}).get("nodeName", ""),
        created_at=_ts(meta.get("creationTimestamp")) or datetime.now(UTC),
        reason=status.get("reason") or ("PodGone" if phase == "Gone" else None),
        message=status.get("message"), report=ShardReport.from_pod(pod), resume=resume,
        carried=Carried.parse(annotations.get(ANNOTATION_CARRIED)),
        deleting=bool(meta.get("deletionTimestamp")),
        finished_at=_ts(terminated.get("finishedAt")) if terminated else None,
        unschedulable=unschedulable,
    )


def _failed(view: PodView, reason: str, message: str) -> PodView:
    return PodView(view.name, view.shard, view.replica, view.attempt, "Failed", view.node, view.created_at,
                   reason, message, view.report, view.resume, view.carried, view.deleting, view.finished_at)


def _ts(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
