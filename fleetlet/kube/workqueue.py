"""A keyed work queue with per-key backoff: what a controller's workers take keys from.

Semantics (client-go's, which every Kubernetes controller relies on): a key waits in the queue at most once, so
a burst of events about one object costs one sync; a key being processed is never handed to a second worker, and
if it is added meanwhile it is processed once more afterwards (nothing is lost, nothing runs twice at once);
``add_after`` schedules a key for later, keeping the earliest time if it is scheduled twice; ``add_backoff``
schedules it after an exponential, jittered, capped delay that grows with the key's consecutive failures until
``forget`` resets them.

Single event loop only; never blocks the loop; keeps no state outside the instance.
"""

from __future__ import annotations

import asyncio
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
        self._wakeup = asyncio.Event()
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
        self._wakeup.set()

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
        self._wakeup.set()

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
            self._promote(loop.time())
            if self._ready:
                key = self._ready.popleft()
                self._queued.discard(key)
                self._processing.add(key)
                return key
            self._wakeup.clear()
            timeout = self._delayed[0][0] - loop.time() if self._delayed else None
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def shut_down(self) -> None:
        self._closed = True
        self._wakeup.set()

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
        # Drop stale heap entries lazily but keep the heap from growing without bound under churn.
        if len(heap) > 4 * len(self._due) + 1024:
            self._delayed = [e for e in heap if self._due.get(e[2]) == e[0]]
            heapq.heapify(self._delayed)


class QueueShutDown(Exception):
    """The queue was shut down; workers stop."""
