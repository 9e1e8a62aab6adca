"""The planner: what a FleetJob's shards need next. Pure: same inputs, same plan.

Where shard progress lives, and why (a 100,000-shard job must neither create 100,000 objects at once nor write a
status too large for etcd, and must survive an operator restart):

- a shard in flight is recorded by its **pods**. Each replica of a shard is a chain of attempts
  ``<job>-<shard>-<replica>-<attempt>``; the newest attempt carries, in its assignment and one annotation, where it
  resumes from and what earlier attempts spent. Failed attempts (the shard's own failures) are kept until the
  shard settles: they are its retry count, visible with ``kubectl get pods``. At most ``parallelism`` shards are in
  flight, so pods are bounded by parallelism x (replicas + retries).
- a settled shard (accepted result, or failed for good) is recorded in the job's **ledger**: ConfigMaps of 1,024
  shards each, owned by the FleetJob. A departed replica whose next attempt does not exist yet (the job is
  suspended) keeps its resume point there too. The ledger is written *before* the pods it replaces are deleted.
- the FleetJob **status** holds only counts and conditions: O(1) in the number of shards.

Per shard: a replica whose car departed (``reasons.classify``) resumes from its checkpoint in a new attempt
without spending a retry; a failed attempt is retried with capped exponential backoff until ``retries`` is spent,
then the shard (and the job) fails with its reason. Results are accepted when ``quorum`` of them from different
cars and different owners agree. A shard run on one car (``replicas: 1``) is audited on a second car with BOINC's
adaptive replication: always while the car's run of valid results is shorter than ``trust_streak``, later with
probability max(``spotCheckRate``, 1/streak); the roll is a hash of (job, shard), so a restart decides the same.
Cars whose results lose a vote lose trust; a tie gets another replica, up to ``max_extra_replicas``. A car that
loses trust also loses the accepted results it alone vouched for while the job is not merged yet (``_reopen``):
they are withdrawn and computed again on other cars.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from fleetlet.api.v1alpha1 import FleetJob
from fleetlet.api.v1alpha1.shard import ShardCheckpoint

from .model import (
    Carried,
    CarView,
    JobEvent,
    LedgerEntry,
    Plan,
    PodCreate,
    PodView,
    ResumePoint,
    TrustVerdict,
)
from .reasons import GONE, Outcome, classify


@dataclass(frozen=True)
class PlanSettings:
    trust_streak: int = 10  # BOINC's default: consecutive valid results before a car works unreplicated
    max_extra_replicas: int = 3  # tiebreakers a shard may get beyond its replicas
    backoff_base_s: float = 10.0
    backoff_cap_s: float = 300.0
    max_creates: int = 500  # per reconcile: status keeps flowing while a big job ramps up
    resync_s: float = 60.0
    # A pod on a car whose link has been down this long resumes elsewhere even if Kubernetes never evicts it.
    # The taint-eviction controller normally does (the pods tolerate unreachable for a shorter time), but the
    # node lifecycle controller stops tainting in a zone where most Nodes are NotReady (its guard against
    # evicting a datacenter over a network split), and a fleet whose cars go offline together is just that.
    # None: rely on Kubernetes alone.
    lost_car_s: float | None = None


@dataclass(frozen=True)
class JobInputs:
    job: FleetJob
    total_shards: int
    pods: Mapping[int, Sequence[PodView]]  # shard -> its pods (and tombstones of pods that vanished)
    ledger: Mapping[int, LedgerEntry]
    cars: Mapping[str, CarView]
    classes: Mapping[int, Sequence[Sequence[str]]]  # shard -> agreement classes of its result digests
    started_at: datetime
    now: datetime
    settings: PlanSettings = field(default_factory=PlanSettings)

    def items(self, shard: int) -> int:
        size, total = self.job.spec.shard_size, self.job.spec.input.items
        return max(0, min(size, total - shard * size))


def audit_roll(job_uid: str, shard: int) -> float:
    """A number in [0, 1) fixed by (job, shard): the same audit decision after any restart."""
    h = hashlib.sha256(f"{job_uid}/{shard}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def plan(inp: JobInputs) -> Plan:
    spec = inp.job.spec
    out = Plan()
    counts = out.counts
    counts.total = inp.total_shards
    stopping = bool(spec.suspend)
    started = sorted(set(inp.pods) | set(inp.ledger))
    in_flight = 0
    failed: list[tuple[int, str]] = []
    waits: list[float] = []
    for i in started:
        if i >= inp.total_shards:
            out.deletes += [p.name for p in inp.pods.get(i, ()) if p.phase != "Gone"]
            continue
        entry = inp.ledger.get(i, LedgerEntry())
        reopened = _reopen(inp, i, entry, out)
        if reopened is not None:
            entry = reopened
        if entry.settled:
            _count_settled(inp, i, entry, out)
            if entry.failed is not None:  # settled failed, but the job's status may not say so yet (a crash)
                failed.append((i, entry.failed))
            out.deletes += [p.name for p in inp.pods.get(i, ()) if p.phase != "Gone" and not p.deleting]
            continue
        shard = _Shard(inp, i, entry, out, may_create=not stopping)
        shard.decide()
        if shard.failed is not None:
            failed.append((i, shard.failed))
        elif not shard.settled:
            in_flight += 1
        if shard.wait is not None:
            waits.append(shard.wait)
    # Settle the job-level questions before starting anything new.
    budget = _over_budget(inp, out.counts.energy_kwh)
    deadline = _deadline(inp)
    if failed:
        shard_no, why = failed[0]
        more = f" (and {len(failed) - 1} more shards)" if len(failed) > 1 else ""
        out.failed = ("RetriesExhausted", f"shard {shard_no} failed: {why}{more}")
    elif budget is not None:
        out.failed = ("BudgetExceeded", budget)
    elif deadline is not None and deadline <= 0:
        out.failed = ("DeadlineExceeded", f"the job ran past its deadline of {spec.deadline_seconds} s")
    if out.failed is not None or stopping:
        out.creates.clear()
        out.deletes += [p.name for ps in inp.pods.values() for p in ps if not p.terminal and not p.deleting]
    else:
        for i in _unstarted(inp, started):
            if in_flight >= spec.parallelism or len(out.creates) >= inp.settings.max_creates:
                break
            shard = _Shard(inp, i, LedgerEntry(), out, may_create=True)
            shard.decide()
            in_flight += 1
    if len(out.creates) > inp.settings.max_creates:
        out.creates = out.creates[: inp.settings.max_creates]
        out.more = True
    elif len(out.creates) == inp.settings.max_creates:
        out.more = True
    out.deletes = list(dict.fromkeys(out.deletes))
    waiting = Counter(p.unschedulable for ps in inp.pods.values() for p in ps
                      if p.phase == "Pending" and p.unschedulable and not p.deleting)
    counts.unschedulable = waiting.most_common(1)[0][0] if waiting else None
    counts.pending = max(0, counts.total - counts.verified - counts.failed - counts.running - counts.succeeded)
    out.complete = out.failed is None and counts.verified == counts.total
    if deadline is not None and deadline > 0:
        waits.append(deadline)
    waits.append(inp.settings.resync_s)
    out.requeue_after = min(waits)
    return out


def _unstarted(inp: JobInputs, started: Sequence[int]) -> Iterator[int]:
    seen = set(started)
    return (i for i in range(inp.total_shards) if i not in seen)


def _reopen(inp: JobInputs, i: int, entry: LedgerEntry, out: Plan) -> LedgerEntry | None:
    """Withdraw an accepted result that rests on cars which have all lost trust since (backtracking, as in
    Sarmenta's spot-checking: a car caught lying once is presumed to have lied before). The shard runs again
    from the start, past every earlier attempt's pod name; what it already cost stays counted. Only a job that is
    not merged yet is re-planned, so a withdrawn result never reaches an output."""
    if entry.accepted is None or not entry.cars:
        return None
    if not all((car := inp.cars.get(name)) is not None and car.untrusted for name in entry.cars):
        return None
    first = max([entry.attempts, *(p.attempt + 1 for p in inp.pods.get(i, ()))])
    points = tuple((r, ResumePoint(None, Carried(entry.energy_kwh, entry.departures) if r == 0 else Carried(),
                                   first))
                   for r in range(inp.job.spec.verification.replicas))
    reopened = LedgerEntry(resume=points, reopened=entry.reopened + 1)
    out.ledger[i] = reopened
    out.reopened.append(i)
    out.events.append(JobEvent("Warning", "ResultWithdrawn",
                               f"shard {i}: its accepted result came from {', '.join(entry.cars)} alone, which "
                               "has since lost trust; the shard runs again on other cars"))
    return reopened


def _count_settled(inp: JobInputs, i: int, entry: LedgerEntry, out: Plan) -> None:
    c = out.counts
    c.energy_kwh += entry.energy_kwh
    c.departures += entry.departures
    c.failures += entry.failures
    if entry.accepted is not None:
        c.verified += 1
        c.items_done += inp.items(i)
    else:
        c.failed += 1


def _over_budget(inp: JobInputs, energy_kwh: float) -> str | None:
    b = inp.job.spec.budget
    if b.max_energy_kwh is not None and energy_kwh > b.max_energy_kwh:
        return f"the cars spent {energy_kwh:.3f} kWh, over the budget of {b.max_energy_kwh} kWh"
    cost = energy_kwh * b.price_per_kwh
    if b.max_cost is not None and cost > b.max_cost:
        return f"the job cost {cost:.2f} {b.currency}, over the budget of {b.max_cost} {b.currency}"
    return None


def _deadline(inp: JobInputs) -> float | None:
    """Seconds until the deadline (<= 0: passed), or None without one."""
    seconds = inp.job.spec.deadline_seconds
    if seconds is None:
        return None
    return seconds - (inp.now - inp.started_at).total_seconds()


class _Shard:
    """The decisions for one shard. Appends to the shared ``Plan``."""

    def __init__(self, inp: JobInputs, index: int, entry: LedgerEntry, out: Plan, *, may_create: bool) -> None:
        self.inp = inp
        self.i = index
        self.entry = entry
        self.out = out
        self.may_create = may_create
        self.spec = inp.job.spec
        self.pods = sorted(inp.pods.get(index, ()), key=lambda p: (p.replica, p.attempt))
        self.chains: dict[int, list[PodView]] = {}
        for p in self.pods:
            self.chains.setdefault(p.replica, []).append(p)
        self.current = {r: chain[-1] for r, chain in self.chains.items()}
        self.failures = [p for p in self.pods if p.phase == "Failed" and classify(p.reason) is Outcome.FAILURE]
        replicas_seen = set(self.chains) | {r for r, _ in entry.resume}
        self.replicas = max([self.spec.verification.replicas, *(r + 1 for r in replicas_seen)])
        self.audited = self.spec.verification.replicas == 1 and self.replicas > 1
        self.failed: str | None = None
        self.settled = False
        self.wait: float | None = None
        self.new_entry = entry

    # ---- the decision ---------------------------------------------------------------------------------------

    def decide(self) -> None:
        if self._verify():
            return
        for r in range(self.replicas):
            if self.failed is not None:
                break  # failed for good (counted once): the other replicas need nothing more
            self._replica(r)
        self._account()
        if self.new_entry != self.entry:
            self.out.ledger[self.i] = self.new_entry

    def _verify(self) -> bool:
        """Accept the shard if its results allow; returns True once settled (accepted or failed)."""
        results = self._results()
        if not results:
            return False
        digests = list(dict.fromkeys(d for _, p in results if p.report and (d := p.report.result_sha256)))
        known = {d for cls in self.inp.classes.get(self.i, ()) for d in cls}
        if len(digests) > 1 and not known.issuperset(digests):
            # The controller classifies them (again, when a new digest came in since), then plans again.
            self.out.compare.append(self.i)
            return False
        spec = self.spec.verification
        # The audit decision comes before any quorum: with replicas 1 a single result is always a quorum of 1.
        if spec.replicas == 1 and not self.audited and len(results) == 1:
            r0, p0 = results[0]
            car = self.inp.cars.get(p0.node)
            streak = car.valid_streak if car is not None else 0
            chance = 1.0 if streak < self.inp.settings.trust_streak else max(spec.spot_check_rate, 1.0 / streak)
            if audit_roll(self.inp.job.metadata.uid or "", self.i) >= chance:
                self._accept(results, [(r0, p0)], compared=False)
                return True
            self.audited = True  # verify this one on a second car first
            self.replicas = max(self.replicas, 2)
            return False
        classes = [list(c) for c in self.inp.classes.get(self.i, [digests])]
        best = max((self._distinct(results, cls) for cls in classes), key=len)
        quorum = max(spec.quorum, 2) if self.audited else spec.quorum
        if len(best) >= quorum:
            self._accept(results, best, compared=self.replicas > 1)
            return True
        finished = all(r in self.current and self.current[r].phase == "Succeeded" for r in range(self.replicas))
        if finished:  # every replica answered and no quorum: a tiebreaker, or give up
            limit = spec.replicas + self.inp.settings.max_extra_replicas + (1 if self.audited else 0)
            if self.replicas < limit:
                self.replicas += 1
                cars = ", ".join(sorted({p.node for _, p in results}))
                why = "disagree" if len(digests) > 1 else "agree but are no quorum (one owner, or cars not trusted)"
                if self.may_create:  # said once, when the extra car is asked (not on every look while suspended)
                    self.out.events.append(JobEvent("Warning", "ResultsDisagree",
                                                    f"shard {self.i}: the results of {cars} {why}; asking one more car"))
            else:
                self._fail(f"no {quorum} agreeing results from different cars and owners after "
                           f"{self.replicas} replicas")
                return True
        return False

    def _results(self) -> list[tuple[int, PodView]]:
        out = []
        for r in sorted(self.current):
            p = self.current[r]
            if p.phase != "Succeeded" or p.report is None or p.report.result_sha256 is None or not p.node:
                continue
            car = self.inp.cars.get(p.node)
            if car is not None and car.untrusted:
                continue  # a car that lost trust meanwhile: its word no longer counts
            out.append((r, p))
        return out

    def _distinct(self, results: list[tuple[int, PodView]], cls: Sequence[str]) -> list[tuple[int, PodView]]:
        """The results in ``cls`` from pairwise different cars and owners, in replica order."""
        cars: set[str] = set()
        owners: set[str] = set()
        out = []
        for r, p in results:
            if p.report is None or p.report.result_sha256 not in cls:
                continue
            owner = self.inp.cars[p.node].owner if p.node in self.inp.cars else f"?{p.node}"
            if p.node in cars or owner in owners:
                continue
            cars.add(p.node)
            owners.add(owner)
            out.append((r, p))
        return out

    def _accept(self, results: list[tuple[int, PodView]], winners: list[tuple[int, PodView]],
                *, compared: bool) -> None:
        digest = winners[0][1].report.result_sha256 if winners[0][1].report else None
        assert digest is not None
        winning = {r for r, _ in winners}
        if compared:
            for r, p in results:
                contributors = _contributors(p)
                said = p.report.result_sha256 if p.report is not None else None
                # A result equal to the accepted one is valid even when it did not count (a second car of a
                # winning owner): only a different answer loses trust.
                valid = r in winning or said == digest or self._same_class(said, digest)
                for car in contributors:
                    self.out.trust.append(TrustVerdict(car, valid, len(contributors) == 1, self.i))
                if not valid:
                    self.out.events.append(JobEvent(
                        "Warning", "ResultRejected",
                        f"shard {self.i}: the result of {', '.join(contributors)} disagreed with "
                        f"{len(winners)} other cars; it was rejected and the car loses trust"))
        energy = self._energy()
        attempts = max([p.attempt + 1 for p in self.pods]
                       + [pt.next_attempt for _, pt in (*self.entry.resume, *self.new_entry.resume)])
        self.new_entry = LedgerEntry(accepted=digest, energy_kwh=energy, cars=tuple(p.node for _, p in winners),
                                     departures=self._departures(), failures=len(self.failures),
                                     attempts=attempts, reopened=self.entry.reopened)
        self.out.ledger[self.i] = self.new_entry
        self.out.deletes += [p.name for p in self.pods if p.phase != "Gone" and not p.deleting]
        self.settled = True
        c = self.out.counts
        c.verified += 1
        c.items_done += self.inp.items(self.i)
        c.energy_kwh += energy
        c.departures += self.new_entry.departures
        c.failures += self.new_entry.failures

    def _same_class(self, a: str | None, b: str) -> bool:
        return any(a in cls and b in cls for cls in self.inp.classes.get(self.i, ()))

    def _fail(self, why: str) -> None:
        energy = self._energy()
        self.failed = why
        self.new_entry = LedgerEntry(failed=why[:512], energy_kwh=energy, departures=self._departures(),
                                     failures=len(self.failures))
        self.out.ledger[self.i] = self.new_entry
        self.out.events.append(JobEvent("Warning", "ShardFailed", f"shard {self.i} failed for good: {why}"))
        self.settled = True
        self.out.counts.failed += 1
        self.out.counts.energy_kwh += energy
        self.out.counts.departures += self.new_entry.departures
        self.out.counts.failures += self.new_entry.failures

    # ---- one replica ----------------------------------------------------------------------------------------

    def _replica(self, r: int) -> None:
        cur = self.current.get(r)
        point = self.new_entry.resume_of(r)
        if cur is None or (point is not None and cur.attempt + 1 < point.next_attempt):
            # No pod, or the ledger knows a later attempt than the pods show (it departed, its pod and tombstone
            # are gone after a restart): resume from the ledger.
            if point is None:
                self._create(r, 0, None, Carried())
            else:
                self._create(r, point.next_attempt, point.checkpoint, point.carried)
            return
        if point is not None and cur.attempt >= point.next_attempt:
            self.new_entry = self.new_entry.with_resume(r, None)  # the next attempt exists: it carries it now
        if not cur.terminal:
            self._if_lost(r, cur)
            return
        if cur.phase == "Succeeded":
            car = self.inp.cars.get(cur.node)
            if car is None or not car.untrusted:
                return
            # The car lost trust after it finished: its result no longer counts. Run the replica again, from the
            # start (its checkpoints are not trusted either), without spending a retry: it is not the shard's fault.
            carried = Carried(cur.carried.energy_kwh + cur.energy_kwh, cur.carried.departures,
                              cur.carried.cars + ((cur.node,) if cur.node not in cur.carried.cars else ()))
            self.new_entry = self.new_entry.with_resume(r, ResumePoint(None, carried, cur.attempt + 1))
            if not cur.deleting:
                self.out.deletes.append(cur.name)
            self._create(r, cur.attempt + 1, None, carried, "distrusted")
            return
        if classify(cur.reason) is Outcome.DEPARTURE or cur.phase == "Gone":
            carried = cur.carried.then(cur.energy_kwh, cur.node)
            point = ResumePoint(cur.checkpoint, carried, cur.attempt + 1)
            # Durable before the pod goes: if the next attempt cannot be created now, the ledger keeps where to
            # resume (and what it cost) for when it can.
            self.new_entry = self.new_entry.with_resume(r, point)
            if cur.phase != "Gone" and not cur.deleting:
                self.out.deletes.append(cur.name)
            self._create(r, cur.attempt + 1, cur.checkpoint, carried, "departure")
            return
        if len(self.failures) > self.spec.retries:
            self._fail(f"{cur.reason or 'Error'}: {cur.message or 'the shard failed'} "
                       f"({len(self.failures)} failures, retries: {self.spec.retries})")
            return
        s = self.inp.settings
        wait = min(s.backoff_cap_s, s.backoff_base_s * 2 ** (len(self.failures) - 1))
        since = cur.finished_at or cur.created_at
        left = wait - (self.inp.now - since).total_seconds()
        if left > 0:
            self.wait = left if self.wait is None else min(self.wait, left)
            return
        # The failed attempt stays (it is the retry count); the next one does not carry its energy. If it resumes
        # from the failed attempt's own checkpoint, that car contributed to the result: it shares it, for trust.
        carried = cur.carried
        if cur.checkpoint != cur.resume and cur.node and cur.node not in carried.cars:
            carried = Carried(carried.energy_kwh, carried.departures, (*carried.cars, cur.node))
        self._create(r, cur.attempt + 1, cur.checkpoint, carried, "failure")

    def _if_lost(self, r: int, cur: PodView) -> None:
        """A pod whose car has been unreachable for ``lost_car_s`` is a departure: resume from its last
        checkpoint in a new attempt, and delete it without waiting for a kubelet that is gone."""
        limit = self.inp.settings.lost_car_s
        car = self.inp.cars.get(cur.node) if cur.node else None
        if limit is None or car is None or car.lost_since is None:
            return
        left = limit - (self.inp.now - car.lost_since).total_seconds()
        if left > 0:
            self.wait = left if self.wait is None else min(self.wait, left)  # look again when it would be lost
            return
        carried = cur.carried.then(cur.energy_kwh, cur.node)
        self.new_entry = self.new_entry.with_resume(r, ResumePoint(cur.checkpoint, carried, cur.attempt + 1))
        self.out.force_deletes.append(cur.name)
        self.out.events.append(JobEvent("Warning", "CarLost", f"car {cur.node} has been unreachable since "
                                        f"{car.lost_since.isoformat(timespec='seconds')}: shard {self.i} "
                                        f"resumes elsewhere from its last checkpoint"))
        self._create(r, cur.attempt + 1, cur.checkpoint, carried, "departure")

    def _create(self, r: int, attempt: int, resume: ShardCheckpoint | None, carried: Carried,
                cause: str = "") -> None:
        if not self.may_create:
            return
        cars: set[str] = set()
        for other, p in self.current.items():
            if other != r:
                cars.update(_contributors(p))
        owners = {self.inp.cars[c].owner for c in cars if c in self.inp.cars}
        self.out.creates.append(PodCreate(self.i, r, attempt, resume, carried, tuple(sorted(cars)),
                                          tuple(sorted(owners)), cause))

    # ---- bookkeeping ----------------------------------------------------------------------------------------

    def _energy(self) -> float:
        energy = 0.0
        for r in range(self.replicas):
            chain = self.chains.get(r, [])
            point = self.entry.resume_of(r)
            if point is not None and (not chain or chain[-1].attempt + 1 < point.next_attempt):
                # The ledger's resume point is newer than any pod: it carries what the later attempts spent.
                energy += point.carried.energy_kwh
                energy += sum(p.energy_kwh for p in chain if p.phase == "Failed"
                              and classify(p.reason) is Outcome.FAILURE)
            elif chain:
                cur = chain[-1]
                energy += cur.carried.energy_kwh + cur.energy_kwh
                energy += sum(p.energy_kwh for p in chain[:-1] if p.phase == "Failed"
                              and classify(p.reason) is Outcome.FAILURE)
        return energy

    def _account(self) -> None:
        if self.settled:
            return
        c = self.out.counts
        live = [p for p in self.current.values() if not p.terminal]
        if any(p.phase == "Running" for p in live):
            c.running += 1
        elif any(p.phase == "Succeeded" for p in self.current.values()):
            c.succeeded += 1
        # In-flight progress never falls back after a departure: a resumed attempt has done its checkpoint's items
        # before it says anything, and so has a replica waiting in the ledger to resume.
        done = [p.report.items_done for p in self.current.values() if p.report is not None]
        done += [p.checkpoint.items_done for p in self.current.values() if p.checkpoint is not None]
        done += [pt.checkpoint.items_done for _, pt in self.new_entry.resume if pt.checkpoint is not None]
        progress = max(done, default=0)
        c.items_done += min(progress, self.inp.items(self.i))
        c.energy_kwh += self._energy()
        c.failures += len(self.failures)
        c.departures += self._departures()

    def _departures(self) -> int:
        """How often this shard's cars drove off so far (each chain carries its count; a departed pod not yet
        replaced counts once more)."""
        total = 0
        for r in range(self.replicas):
            cur = self.current.get(r)
            point = self.new_entry.resume_of(r) or self.entry.resume_of(r)
            if cur is None:
                total += point.carried.departures if point is not None else 0
                continue
            total += cur.carried.departures
            if cur.terminal and cur.phase != "Succeeded" and (cur.phase == "Gone"
                                                             or classify(cur.reason) is Outcome.DEPARTURE):
                total += 1
        return total


def _contributors(p: PodView) -> tuple[str, ...]:
    cars = p.carried.cars + ((p.node,) if p.node and p.node not in p.carried.cars else ())
    return tuple(c for c in cars if c and c != GONE)
