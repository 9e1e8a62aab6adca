"""The controller toolkit's semantics without a cluster: the work queue (dedupe, no key on two workers, re-run
after a change during processing, delays, backoff), the controller (outcomes, retries after exceptions, a hung
sync times out) and the informer's store (relist diff reports what vanished, transforms, indexes, filters).

The informer is fed by a scripted stand-in for ``KubeClient.list/watch`` here; against the real API server (and
through the fault-injecting proxy) it is exercised by the integration tests.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fleetlet.kube import ApiError, WatchEvent
from fleetlet.kube.controller import Controller, GiveUp, Requeue, Retry
from fleetlet.kube.informer import Change, Informer, object_key
from fleetlet.kube.workqueue import Backoff, QueueShutDown, WorkQueue

# ---- work queue -----------------------------------------------------------------------------------------------


async def test_a_key_added_many_times_waits_in_the_queue_once() -> None:
    q = WorkQueue()
    for _ in range(5):
        q.add("a")
    q.add("b")
    assert len(q) == 2
    assert [await q.get(), await q.get()] == ["a", "b"]


async def test_a_key_added_while_processing_runs_again_after_done_but_never_twice_at_once() -> None:
    q = WorkQueue()
    q.add("a")
    key = await q.get()
    q.add("a")  # a change arrives while a worker holds the key
    assert len(q) == 0, "the key must not be handed to a second worker while the first still holds it"
    q.done(key)
    assert len(q) == 1 and await q.get() == "a"


async def test_add_after_keeps_the_earliest_schedule_and_an_immediate_add_wins() -> None:
    q = WorkQueue()
    q.add_after("a", 10.0)
    q.add_after("a", 0.05)
    q.add_after("a", 5.0)
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(q.get(), 1.0) == "a"
    assert asyncio.get_running_loop().time() - started < 1.0
    q.done("a")
    q.add_after("b", 10.0)
    q.add("b")
    assert await asyncio.wait_for(q.get(), 0.5) == "b"
    q.done("b")
    assert q.scheduled == 0


async def test_backoff_grows_per_key_with_failures_is_capped_and_forget_resets_it() -> None:
    backoff = Backoff(base_s=1.0, cap_s=8.0)
    q = WorkQueue(backoff=backoff, rng=random.Random(1))
    delays = [q.add_backoff("a") for _ in range(6)]
    assert q.failures("a") == 6
    ceilings = [1, 2, 4, 8, 8, 8]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    assert q.failures("b") == 0
    q.forget("a")
    assert q.failures("a") == 0 and q.add_backoff("a") <= 1.0


async def test_get_waits_for_a_scheduled_key_and_shut_down_releases_waiters() -> None:
    q = WorkQueue()
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0.02)
    assert not getter.done()
    q.add_after("x", 0.05)
    assert await asyncio.wait_for(getter, 1.0) == "x"
    waiter = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    q.shut_down()
    with pytest.raises(QueueShutDown):
        await asyncio.wait_for(waiter, 1.0)


async def test_each_ready_key_wakes_one_waiting_worker_and_a_cancelled_worker_passes_its_key_on() -> None:
    q = WorkQueue()
    waiting = [asyncio.create_task(q.get()) for _ in range(8)]
    await asyncio.sleep(0)
    q.add("a")
    await asyncio.sleep(0)
    woken = [t for t in waiting if t.done()]
    assert [t.result() for t in woken] == ["a"], "one key wakes one worker"
    # A worker woken for a key but cancelled before it takes it must not take the key with it.
    q.add("b")
    target = next(t for t in waiting if not t.done())
    target.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    taken = [t.result() for t in waiting if t.done() and not t.cancelled()]
    assert sorted(taken) == ["a", "b"], taken
    q.shut_down()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_many_scheduled_keys_share_one_timer_and_come_out_in_due_order() -> None:
    q = WorkQueue()
    dues = {f"k{i}": 0.01 * ((i * 7) % 20) + 0.01 for i in range(20)}
    for key, delay in dues.items():
        q.add_after(key, delay)
    q.add_after("k3", 0.5)  # a later schedule of a key already due sooner is ignored
    got = [await asyncio.wait_for(q.get(), 1.0) for _ in dues]
    assert got == sorted(dues, key=lambda k: (dues[k], int(k[1:]))), got
    assert q.scheduled == 0


# ---- controller -----------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str]] = []

    def sync_finished(self, controller: str, outcome: str, seconds: float) -> None:
        self.outcomes.append((controller, outcome))

    def queue_depth(self, controller: str, ready: int, scheduled: int) -> None:
        pass


async def _run_until(controller: Controller, done: asyncio.Event, timeout_s: float = 5.0) -> None:
    task = asyncio.create_task(controller.run())
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_exception_in_sync_is_retried_until_it_succeeds_so_no_key_is_lost() -> None:
    calls: list[str] = []
    done = asyncio.Event()

    async def sync(key: str) -> None:
        calls.append(key)
        if len(calls) < 3:
            raise RuntimeError("the API server hiccupped")
        done.set()

    rec = Recorder()
    c = Controller("t", sync, backoff=Backoff(base_s=0.01, cap_s=0.02), observer=rec)
    c.enqueue("k")
    await _run_until(c, done)
    assert calls == ["k", "k", "k"]
    assert [o for _, o in rec.outcomes] == ["error", "error", "ok"]
    assert c.queue.failures("k") == 0  # success forgot the failures


async def test_retry_with_a_delay_requeue_and_give_up_do_what_they_say() -> None:
    seen: dict[str, int] = {}
    done = asyncio.Event()

    async def sync(key: str) -> Requeue | None:
        seen[key] = seen.get(key, 0) + 1
        if key == "retry" and seen[key] == 1:
            raise Retry("car not connected", delay=0.02)
        if key == "requeue" and seen[key] < 3:
            return Requeue(after=0.01)
        if key == "giveup":
            raise GiveUp("invalid spec")
        if seen.get("retry", 0) >= 2 and seen.get("requeue", 0) >= 3:
            done.set()
        return None

    rec = Recorder()
    c = Controller("t", sync, workers=3, observer=rec)
    for key in ("retry", "requeue", "giveup"):
        c.enqueue(key)
    await _run_until(c, done)
    await asyncio.sleep(0.05)
    assert seen["giveup"] == 1, "a key given up is not retried until something enqueues it again"
    assert seen["retry"] == 2 and seen["requeue"] == 3
    outcomes = [o for _, o in rec.outcomes]
    assert {"retry", "requeue", "giveup", "ok"} <= set(outcomes)


async def test_a_hung_sync_times_out_and_other_keys_keep_flowing() -> None:
    slow_retried = asyncio.Event()
    order: list[str] = []

    async def sync(key: str) -> None:
        order.append(key)
        if key == "slow":
            if order.count("slow") == 1:
                await asyncio.sleep(30)
            else:
                slow_retried.set()

    rec = Recorder()
    c = Controller("t", sync, workers=2, sync_timeout_s=0.1, backoff=Backoff(0.01, 0.02), observer=rec)
    c.enqueue("slow")
    c.enqueue("fast")
    await _run_until(c, slow_retried)
    assert order.index("fast") < order.index("slow", 1), "the other key ran while the slow one hung"
    assert ("t", "timeout") in rec.outcomes


# ---- informer -------------------------------------------------------------------------------------------------


def _obj(name: str, rv: int, ns: str | None = "default", **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "resourceVersion": str(rv), "managedFields": [{"big": "x" * 100}]}
    if ns:
        meta["namespace"] = ns
    return {"metadata": meta, **extra}


class ScriptedApi:
    """Answers list() from ``lists`` in turn and serves ``watches`` (lists of events or an exception) in turn."""

    def __init__(self, lists: list[list[dict[str, Any]]], watches: list[Any]) -> None:
        self.lists = lists
        self.watches = watches
        self.list_calls = 0
        self.exhausted = asyncio.Event()

    async def list(self, path: str, **params: Any) -> dict[str, Any]:
        items = self.lists[min(self.list_calls, len(self.lists) - 1)]
        self.list_calls += 1
        return {"metadata": {"resourceVersion": str(100 * self.list_calls)}, "items": [dict(i) for i in items]}

    async def watch(self, path: str, rv: str | None, **params: Any) -> AsyncIterator[WatchEvent]:
        if not self.watches:
            self.exhausted.set()
            await asyncio.sleep(3600)
        step = self.watches.pop(0)
        if isinstance(step, Exception):
            raise step
        for kind, obj in step:
            yield WatchEvent(kind, obj)


async def _inform(api: ScriptedApi, **kwargs: Any) -> tuple[Informer, list[Change]]:
    changes: list[Change] = []
    inf = Informer(api, "/api/v1/pods", max_backoff_s=0.01, **kwargs)  # type: ignore[arg-type]
    inf.add_handler(changes.append)
    task = asyncio.create_task(inf.run())
    try:
        await asyncio.wait_for(api.exhausted.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return inf, changes


async def test_a_relist_after_410_reports_objects_deleted_while_the_watch_was_down() -> None:
    api = ScriptedApi(
        lists=[[_obj("a", 1), _obj("b", 1)], [_obj("a", 5)]],  # b vanished, a changed, during the gap
        watches=[[("MODIFIED", _obj("a", 2))], ApiError(410, "Expired", "too old")],
    )
    inf, changes = await _inform(api)
    assert [(c.type, c.key) for c in changes] == [
        ("ADDED", "default/a"), ("ADDED", "default/b"), ("MODIFIED", "default/a"),
        ("MODIFIED", "default/a"), ("DELETED", "default/b"),
    ]
    assert sorted(inf.keys()) == ["default/a"]
    assert inf.relists == 1
    deleted = changes[-1]
    assert deleted.obj["metadata"]["name"] == "b", "a DELETED change carries the last known object"


async def test_the_store_is_trimmed_filtered_and_indexed() -> None:
    api = ScriptedApi(
        lists=[[_obj("p1", 1, spec={"nodeName": "car-1"}), _obj("p2", 1, spec={"nodeName": "car-2"}),
                _obj("other", 1, spec={"nodeName": "worker"})]],
        watches=[[("MODIFIED", _obj("p2", 2, spec={"nodeName": "car-1"})),
                  ("MODIFIED", _obj("p1", 2, spec={"nodeName": "worker"}))]],  # no longer a car pod
    )
    inf, changes = await _inform_indexed(api)
    assert sorted(inf.keys()) == ["default/p2"]
    assert inf.by_index("node", "car-1") == frozenset({"default/p2"})
    assert inf.by_index("node", "car-2") == frozenset()
    assert all("managedFields" not in o["metadata"] for _, o in inf.items())
    assert ("DELETED", "default/p1") in [(c.type, c.key) for c in changes]


async def _inform_indexed(api: ScriptedApi) -> tuple[Informer, list[Change]]:
    changes: list[Change] = []
    inf = Informer(api, "/api/v1/pods", max_backoff_s=0.01,  # type: ignore[arg-type]
                   keep=lambda o: o["spec"]["nodeName"].startswith("car-"))
    inf.add_index("node", lambda o: [o["spec"]["nodeName"]])
    inf.add_handler(changes.append)
    task = asyncio.create_task(inf.run())
    try:
        await asyncio.wait_for(api.exhausted.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return inf, changes


async def test_a_failing_handler_does_not_stop_the_others_or_the_stream() -> None:
    api = ScriptedApi(lists=[[_obj("a", 1)]], watches=[[("ADDED", _obj("b", 2)), ("DELETED", _obj("a", 3))]])
    seen: list[str] = []
    inf = Informer(api, "/api/v1/pods")  # type: ignore[arg-type]

    def broken(change: Change) -> None:
        raise RuntimeError("handler bug")

    inf.add_handler(broken)
    inf.add_handler(lambda c: seen.append(f"{c.type} {c.key}"))
    task = asyncio.create_task(inf.run())
    await asyncio.wait_for(api.exhausted.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert seen == ["ADDED default/a", "ADDED default/b", "DELETED default/a"]


async def test_transport_errors_resume_the_watch_without_a_relist() -> None:
    api = ScriptedApi(lists=[[_obj("a", 1)]],
                      watches=[ConnectionResetError("dropped"), [("MODIFIED", _obj("a", 2))]])
    inf, changes = await _inform(api)
    assert api.list_calls == 1 and inf.relists == 0
    assert [(c.type, c.key) for c in changes] == [("ADDED", "default/a"), ("MODIFIED", "default/a")]


def test_object_keys_follow_client_go() -> None:
    assert object_key({"metadata": {"name": "n", "namespace": "ns"}}) == "ns/n"
    assert object_key({"metadata": {"name": "car-1"}}) == "car-1"
