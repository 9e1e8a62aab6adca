"""A controller: workers that take keys from a ``WorkQueue`` and drive each toward what it should be.

What it is for: every Fleetlet component that writes to the API server (the shim's Node, Lease, pod and
telemetry writers, the operator's FleetJob reconciler) is a ``sync(key)`` function run by a ``Controller``. The
function reads the desired and observed state (informer stores, in-memory car state), makes at most the writes
needed, and says what happens next:

- return ``None``: done; the key's backoff is reset.
- return ``Requeue(after=s)``: done for now, look again in ``s`` seconds (a lease renewal, a grace period).
- raise ``Retry(reason, delay=None)``: it could not finish (the API said 429, a car was unreachable); try again
  after ``delay`` or the key's exponential backoff. Any other exception is logged and retried the same way, so a
  bug or a transient failure never loses a key.
- raise ``GiveUp(reason)``: the key cannot make progress until something else changes (an invalid object);
  logged and counted, and the next event about the object enqueues it again.

``sync`` must be idempotent: it may run again for a key at any time (after a crash, a restart, a duplicate
event) and must then do nothing that was already done. Each sync runs under a timeout.

What it must never do: run one key on two workers at once (the queue prevents it), swallow a failure without
scheduling a retry, or let one slow key stall the others (workers are independent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from .client import ApiError
from .workqueue import Backoff, QueueShutDown, WorkQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Requeue:
    """Look at the key again after ``after`` seconds (not a failure: the backoff is reset)."""

    after: float


class Retry(Exception):
    """A transient failure: try the key again after ``delay`` seconds, or after its backoff if None."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


class GiveUp(Exception):
    """A permanent failure for the key as it is now: stop retrying until the next change enqueues it."""


SyncFn = Callable[[str], Awaitable["Requeue | None"]]
Outcome = str  # "ok" | "requeue" | "retry" | "error" | "giveup" | "timeout"


class ControllerObserver(Protocol):
    """Where a controller reports each sync (a component's metrics). Must be cheap and never raise."""

    def sync_finished(self, controller: str, outcome: Outcome, seconds: float) -> None: ...

    def queue_depth(self, controller: str, ready: int, scheduled: int) -> None: ...


class Controller:
    """``workers`` tasks running ``sync`` over keys from one queue. ``await run()`` until cancelled."""

    def __init__(
        self,
        name: str,
        sync: SyncFn,
        *,
        workers: int = 1,
        backoff: Backoff | None = None,
        sync_timeout_s: float = 60.0,
        observer: ControllerObserver | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a controller needs at least one worker")
        self.name = name
        self.sync = sync
        self.workers = workers
        self.sync_timeout_s = sync_timeout_s
        self.queue = WorkQueue(name, backoff)
        self._observer = observer
        self._started = asyncio.Event()

    def enqueue(self, key: str) -> None:
        self.queue.add(key)

    def enqueue_after(self, key: str, delay_s: float) -> None:
        self.queue.add_after(key, delay_s)

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._worker(), name=f"{self.name}-worker-{i}") for i in range(self.workers)]
        self._started.set()
        try:
            await asyncio.gather(*tasks)
        finally:
            self.queue.shut_down()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _worker(self) -> None:
        queue = self.queue
        while True:
            try:
                key = await queue.get()
            except QueueShutDown:
                return
            try:
                await self._process(key)
            finally:
                queue.done(key)
                if self._observer is not None:
                    self._observer.queue_depth(self.name, len(queue), queue.scheduled)

    async def _process(self, key: str) -> None:
        queue = self.queue
        started = time.perf_counter()
        outcome: Outcome = "ok"
        try:
            async with asyncio.timeout(self.sync_timeout_s):
                result = await self.sync(key)
            queue.forget(key)
            if result is not None:
                outcome = "requeue"
                queue.add_after(key, result.after)
        except Retry as exc:
            outcome = "retry"
            if exc.delay is not None:
                queue.add_after(key, exc.delay)
            else:
                delay = queue.add_backoff(key)
                log.info("%s %s: %s; retrying in %.1fs", self.name, key, exc, delay)
        except GiveUp as exc:
            outcome = "giveup"
            queue.forget(key)
            log.warning("%s %s: giving up until it changes: %s", self.name, key, exc)
        except TimeoutError:
            outcome = "timeout"
            delay = queue.add_backoff(key)
            log.warning("%s %s: sync took over %.0fs; retrying in %.1fs", self.name, key, self.sync_timeout_s,
                        delay)
        except asyncio.CancelledError:
            raise
        except ApiError as exc:
            outcome = "error"
            delay = queue.add_backoff(key)
            log.warning("%s %s: %s; retrying in %.1fs", self.name, key, exc, delay)
        except Exception:
            outcome = "error"
            delay = queue.add_backoff(key)
            log.exception("%s %s: sync failed; retrying in %.1fs", self.name, key, delay)
        if self._observer is not None:
            self._observer.sync_finished(self.name, outcome, time.perf_counter() - started)
