"""A keyed work queue with per-key backoff: what a controller's workers take keys from.

Semantics (client-go's, which every Kubernetes controller relies on): a key waits in the queue at most once, so
a burst of events about one object costs one sync; a key being processed is never handed to a second worker, and
if it is added meanwhile it is processed once more afterwards (nothing is lost, nothing runs twice at once);
``add_after`` schedules a key for later, keeping the earliest time if it is scheduled twice; ``add_backoff``
schedules it after an exponential, jittered, capped delay that grows with the key's consecutive failures until
``forget`` resets them.

Waking: a worker waiting in ``get`` is woken only when there is a key for it, one worker per ready key (a wake
that every waiter shares turns each add into as many task switches as there are workers: at 5,000 cars and one
Lease renewal per car every 25 s that was a quarter of the shim's CPU). Delayed keys share one timer, set for the
earliest due time.

Single event loop only; never blocks the loop; keeps no state outside the instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: the n-th consecutive failure waits up to base * 2**n, at most cap."""

    base_s: float = 0.2
    cap_s: float = 30.0

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** min(failures, 30))
        # Full jitter, but never less than half the ceiling: retries spread out and still back off.
        return (rng or random).uniform(ceiling / 2, ceiling)


class WorkQueue:
    """See the module docstring. ``get`` returns a key; the caller must call ``done(key)`` when finished."""

    def __init__(self, name: str = "", backoff: Backoff | None = None, *, rng: random.Random | None = None) -> None:
        self.name = name
        self.backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._ready: deque[str] = deque()
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()  # added while processing: queue again on done()
        self._delayed: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}  # the one live schedule of each delayed key
        self._seq = itertools.count()
        self._failures: dict[str, int] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = float("inf")
        self._closed = False

    # ---- adding ------------------------------------------------------------------------------------------

    def add(self, key: str) -> None:
        if self._closed:
            return
        self._due.pop(key, None)  # an immediate add supersedes a later schedule
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._ready.append(key)
        self._wake_one()

    def add_after(self, key: str, delay_s: float) -> None:
        if delay_s <= 0:
            self.add(key)
            return
        if self._closed or key in self._queued:
            return
        due = asyncio.get_running_loop().time() + delay_s
        current = self._due.get(key)
        if current is not None and current <= due:
            return
        self._due[key] = due
        heapq.heappush(self._delayed, (due, next(self._seq), key))
        if due < self._timer_due:
            self._arm(due)

    def add_backoff(self, key: str) -> float:
        """Schedule ``key`` after its backoff delay (one more failure); returns the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = self.backoff.delay(failures, self._rng)
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        """The key succeeded: its next failure starts from the base delay again."""
        self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        return self._failures.get(key, 0)

    # ---- taking ------------------------------------------------------------------------------------------

    async def get(self) -> str:
        """The next ready key (waits for one). Raises ``QueueShutDown`` once the queue is shut down."""
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise QueueShutDown(self.name)
            if self._delayed and self._delayed[0][0] <= loop.time():
                self._promote(loop.time())
            if self._ready:
                key = self._ready.popleft()
                self._queued.discard(key)
                self._processing.add(key)
                return key
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled() and self._ready:
                    self._wake_one()  # this worker was woken for a key it will not take: pass it on
                raise

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def shut_down(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # ---- looking -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Keys ready now (not counting scheduled ones)."""
        return len(self._ready)

    @property
    def scheduled(self) -> int:
        return len(self._due)

    def is_pending(self, key: str) -> bool:
        return key in self._queued or key in self._due or key in self._dirty

    def _promote(self, now: float) -> None:
        heap = self._delayed
        while heap and heap[0][0] <= now:
            due, _, key = heapq.heappop(heap)
            if self._due.get(key) != due:
                continue  # superseded by an earlier schedule or an immediate add
            del self._due[key]
            if key in self._processing:
                self._dirty.add(key)
            elif key not in self._queued:
                self._queued.add(key)
                self._ready.append(key)
                self._wake_one()
        # Drop stale heap entries lazily but keep the heap from growing without bound under churn.
        if len(heap) > 4 * len(self._due) + 1024:
            self._delayed = [e for e in heap if self._due.get(e[2]) == e[0]]
            heapq.heapify(self._delayed)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _arm(self, due: float) -> None:
        """Fire ``_on_timer`` at ``due`` (replacing a later timer)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due = float("inf")
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        self._promote(loop.time())
        while self._delayed and self._due.get(self._delayed[0][2]) != self._delayed[0][0]:
            heapq.heappop(self._delayed)  # superseded schedules: do not wake up for them
        if self._delayed:
            self._arm(self._delayed[0][0])


class QueueShutDown(Exception):
    """The queue was shut down; workers stop."""
