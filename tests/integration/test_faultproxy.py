"""The fault proxy in front of the real API server, with our KubeClient and Informer behind it: what passes
through works, transient faults are retried, a write whose answer is lost still happened (so creates must be
idempotent), and watches that are cut or expire are resumed without losing an event."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fleetlet.kube.client import NO_RETRY, ApiError, KubeClient, KubeConfig, RetryPolicy, resource_path
from fleetlet.kube.informer import Informer
from tests.faultproxy import CutWatch, Delay, Drop, FaultProxy, Respond
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration

RETRY = RetryPolicy(attempts=6, base_delay_s=0.05, max_delay_s=2.0, timeout_s=15.0)


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"faultproxy-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
async def proxy(cluster: Cluster) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(cluster.kubeconfig, seed=7) as p:
        yield p


@pytest.fixture
async def kube(proxy: FaultProxy, tmp_path: Path) -> AsyncIterator[KubeClient]:
    """A client that talks to the API server through the proxy."""
    async with KubeClient(KubeConfig.from_file(proxy.kubeconfig(tmp_path / "proxy.kubeconfig")), RETRY) as k:
        yield k


@pytest.fixture
async def direct(cluster: Cluster) -> AsyncIterator[KubeClient]:
    """The truth: a client that talks to the API server without the proxy."""
    async with KubeClient(KubeConfig.from_file(cluster.kubeconfig), RETRY) as k:
        yield k


def _cm(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}}


def _cms(namespace: str, name: str | None = None) -> str:
    return resource_path("v1", "configmaps", namespace, name)


async def test_list_create_patch_delete_pass_through(
    kube: KubeClient, direct: KubeClient, proxy: FaultProxy, namespace: str
) -> None:
    namespaces = await kube.list("/api/v1/namespaces")
    assert namespace in {n["metadata"]["name"] for n in namespaces["items"]}
    created = await kube.create(_cms(namespace), _cm("passthrough"))
    assert created["metadata"]["namespace"] == namespace
    await kube.patch(_cms(namespace, "passthrough"), {"data": {"k": "patched"}})
    assert (await direct.get(_cms(namespace, "passthrough")))["data"] == {"k": "patched"}
    await kube.delete(_cms(namespace, "passthrough"))
    with pytest.raises(ApiError) as err:
        await direct.get(_cms(namespace, "passthrough"))
    assert err.value.not_found
    assert proxy.count("POST", r"/configmaps$", 201) == 1
    assert proxy.count("PATCH", r"/configmaps/passthrough$", 200) == 1
    assert proxy.count("DELETE", r"/configmaps/passthrough$", 200) == 1
    assert proxy.count(fault=True) == 0


async def test_a_subprocess_uses_the_proxy_kubeconfig(
    cluster: Cluster, proxy: FaultProxy, namespace: str, tmp_path: Path
) -> None:
    """What a process under test (the shim, kubectl) does with ``--kubeconfig``: client-go included."""
    kubeconfig = proxy.kubeconfig(tmp_path / "proxy.kubeconfig")
    # client-go retries a 429 (or 5xx) only when it carries Retry-After
    proxy.add(Respond(429, retry_after_s=1), method="GET", path=r"/namespaces/[^/]+$", times=1)
    out = await asyncio.to_thread(
        cluster.kubectl, "get", "namespace", namespace, "-o", "name", kubeconfig=kubeconfig
    )
    assert out.stdout.strip() == f"namespace/{namespace}"
    assert proxy.count("GET", rf"/namespaces/{namespace}$", 429) == 1
    assert proxy.count("GET", rf"/namespaces/{namespace}$", 200) == 1


async def test_a_500_on_a_get_is_retried_and_succeeds(
    kube: KubeClient, direct: KubeClient, proxy: FaultProxy, namespace: str
) -> None:
    await direct.create(_cms(namespace), _cm("flaky-get"))
    rule = proxy.add(Respond(500), method="GET", path=r"/configmaps/flaky-get$", times=2)
    got = await kube.get(_cms(namespace, "flaky-get"))
    assert got["metadata"]["name"] == "flaky-get"
    assert rule.hits == 2
    assert [r.status for r in proxy.requests] == [500, 500, 200]


async def test_a_429_with_retry_after_is_honoured(
    kube: KubeClient, direct: KubeClient, proxy: FaultProxy, namespace: str
) -> None:
    await direct.create(_cms(namespace), _cm("throttled"))
    proxy.add(Respond(429, retry_after_s=1), method="GET", path=r"/configmaps/throttled$", times=1)
    started = time.monotonic()
    await kube.get(_cms(namespace, "throttled"))
    assert time.monotonic() - started >= 0.95  # RETRY's own first backoff is at most 0.05s
    assert proxy.count("GET", r"/throttled$", 429) == 1 and proxy.count("GET", r"/throttled$", 200) == 1


async def test_a_create_whose_answer_is_lost_happened_anyway(
    kube: KubeClient, direct: KubeClient, proxy: FaultProxy, namespace: str
) -> None:
    proxy.add(Drop(after_forward=True), method="POST", path=r"/configmaps$", times=1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await kube.request("POST", _cms(namespace), body=_cm("lost-answer"), retry=NO_RETRY)
    assert (await direct.get(_cms(namespace, "lost-answer")))["data"] == {"k": "v"}  # it exists upstream
    [post] = proxy.requests
    assert (post.status, post.upstream_status) == (0, 201)
    with pytest.raises(ApiError) as err:  # the caller's retry: only an idempotent caller copes
        await kube.create(_cms(namespace), _cm("lost-answer"))
    assert err.value.status == 409 and err.value.reason == "AlreadyExists"


async def test_the_clients_own_retry_of_a_lost_create_answers_409(
    kube: KubeClient, direct: KubeClient, proxy: FaultProxy, namespace: str
) -> None:
    """KubeClient retries connection errors for every verb, POST included: when the answer to a create is
    lost, the caller sees 409 AlreadyExists for the object its own call created."""
    proxy.add(Drop(after_forward=True), method="POST", path=r"/configmaps$", times=1)
    with pytest.raises(ApiError) as err:
        await kube.create(_cms(namespace), _cm("retried-create"))
    assert err.value.conflict
    assert [(r.status, r.upstream_status) for r in proxy.requests] == [(0, 201), (409, 409)]
    await direct.get(_cms(namespace, "retried-create"))


async def test_a_watch_streams_real_events_and_resumes_after_cut_watches(
    kube: KubeClient, direct: KubeClient, proxy: FaultProxy, namespace: str
) -> None:
    path = _cms(namespace)
    rv = (await kube.list(path))["metadata"]["resourceVersion"]
    seen: list[str] = []
    streams = 0

    async def watch_and_resume() -> None:
        nonlocal rv, streams
        while True:  # what every watcher must do: the stream ended, so watch again from the last version
            streams += 1
            async for event in kube.watch(path, rv, timeout_s=60):
                rv = event.object["metadata"]["resourceVersion"]
                if event.type != "BOOKMARK" and event.object["metadata"]["name"].startswith("watched-"):
                    seen.append(f"{event.type} {event.object['metadata']['name']}")

    task = asyncio.create_task(watch_and_resume())
    try:
        await proxy.wait_watches(1)
        await direct.create(path, _cm("watched-1"))
        await _until(lambda: len(seen) == 1, "the first event arrived")
        assert proxy.cut_watches() == 1
        await direct.create(path, _cm("watched-2"))  # perhaps while no watch is open
        await direct.delete(_cms(namespace, "watched-1"))
        await _until(lambda: len(seen) == 3, "the events after the cut arrived")
        await asyncio.sleep(0.3)
    finally:
        task.cancel()
    assert seen == ["ADDED watched-1", "ADDED watched-2", "DELETED watched-1"]  # nothing lost, nothing twice
    assert streams == 2 and proxy.count("GET", r"/configmaps$", 200, watch=True) == 2


@pytest.mark.parametrize("in_stream", [False, True], ids=["http-410", "error-event-410"])
async def test_an_injected_410_on_a_watch_is_api_error_gone(
    kube: KubeClient, proxy: FaultProxy, namespace: str, in_stream: bool
) -> None:
    path = _cms(namespace)
    rv = (await kube.list(path))["metadata"]["resourceVersion"]
    proxy.add(Respond(410, in_stream=in_stream), path=r"/configmaps$", watch=True, times=1)
    with pytest.raises(ApiError) as err:
        async for _ in kube.watch(path, rv, timeout_s=30):
            pass
    assert err.value.gone and err.value.reason == "Expired"
    assert proxy.count(watch=True, status=200 if in_stream else 410) == 1


async def test_an_informer_loses_nothing_behind_a_misbehaving_api(
    kube: KubeClient, direct: KubeClient, proxy: FaultProxy, namespace: str
) -> None:
    """Its first two watches expire (410 in the stream), every watch is cut after 3 events, and lists fail
    with 500s, 429s and slow answers at random: the informer's store still ends up equal to the server's."""
    path = _cms(namespace)
    proxy.add(Respond(410, in_stream=True), watch=True, times=2, name="expired")
    proxy.add(CutWatch(after_events=3), name="cut")
    proxy.add(Respond(500), watch=False, probability=0.3, name="500")
    proxy.add(Respond(429, retry_after_s=0.2), watch=False, probability=0.2, name="429")
    proxy.add(Delay(0.2), probability=0.2, name="slow")
    informer = Informer(kube, path, labelSelector="chaos=yes", max_backoff_s=1.0)
    task = asyncio.create_task(informer.run())
    try:
        await _until(
            lambda: informer.synced.is_set() and proxy.faults_hit["expired"] == 2, "both watches expired"
        )
        for i in range(12):
            body = _cm(f"chaos-{i}")
            body["metadata"]["labels"] = {"chaos": "yes"}
            await direct.create(path, body)
        for i in range(0, 12, 3):
            await direct.delete(_cms(namespace, f"chaos-{i}"))
        for i in range(1, 12, 3):
            await direct.patch(_cms(namespace, f"chaos-{i}"), {"data": {"k": "changed"}})

        async def converged() -> bool:
            truth = await direct.list(path, labelSelector="chaos=yes")
            want = {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in truth["items"]}
            have = {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for _, o in informer.items()}
            return want == have

        await _until(converged, "the informer's store equals the API server's", timeout_s=60)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert {key.split("/")[1] for key in informer.keys()} == {f"chaos-{i}" for i in range(12) if i % 3}
    changed = informer.get(f"{namespace}/chaos-1")
    assert changed is not None and changed["data"] == {"k": "changed"}
    hits = proxy.faults_hit
    assert hits["cut"] >= 3, hits  # 28 events, at most 3 per watch
    assert informer.relists >= 2  # each 410 made it list again


async def _until(probe: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting until {what}")
        await asyncio.sleep(0.1)
