"""The fault proxy against a tiny TLS upstream that wants a client certificate (a throwaway CA from
fleetlet.pki): requests and answers pass through, watches stream, and every fault does what it says."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from fleetlet.kube.client import NO_RETRY, ApiError, KubeClient, KubeConfig, RetryPolicy
from fleetlet.pki import CertificateAuthority, subject_of
from tests.faultproxy import CutWatch, Delay, Drop, FaultProxy, Respond

CMS = "/api/v1/namespaces/default/configmaps"
FAST = RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=2.0, timeout_s=5.0)


@dataclass
class Upstream:
    """A stand-in API server; what it saw and what it holds."""

    port: int = 0
    seen: list[tuple[str, str]] = field(default_factory=list)  # (method, path with query)
    configmaps: dict[str, dict[str, Any]] = field(default_factory=dict)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    streams_ended: int = 0

    def saw(self, method: str, path: str) -> int:
        return sum(1 for m, p in self.seen if m == method and p.split("?")[0] == path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create("faultproxy-test-ca")
    ca.pair.write(d, "ca")
    ca.issue("upstream", server=True, ip_addresses=("127.0.0.1",)).write(d, "server")
    ca.issue("admin", organizations=("system:masters",), client=True).write(d, "admin")
    ca.issue("viewer", client=True).write(d, "viewer")
    return d


def _kubeconfig(pki: Path, port: int, path: Path) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "up", "cluster": {"server": f"https://127.0.0.1:{port}",
                                                "certificate-authority": str(pki / "ca.crt")}}],
        "users": [
            {"name": "admin", "user": {"client-certificate": str(pki / "admin.crt"),
                                       "client-key": str(pki / "admin.key")}},
            # relative paths resolve against the kubeconfig's directory, also for a user chosen by name
            {"name": "viewer",
             "user": {"client-certificate": "pki/viewer.crt", "client-key": "pki/viewer.key"}},
            {"name": "robot", "user": {"token": "s3cret"}},
        ],
        "contexts": [{"name": "up", "context": {"cluster": "up", "user": "admin", "namespace": "team-a"}}],
        "current-context": "up",
    }
    (path.parent / "pki").mkdir(exist_ok=True)
    for stem in ("viewer.crt", "viewer.key"):
        (path.parent / "pki" / stem).write_bytes((pki / stem).read_bytes())
    path.write_text(yaml.safe_dump(doc))
    return path


def _app(state: Upstream) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        state.seen.append((request.method, request.path_qs))
        peer = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = peer.getpeercert(binary_form=True) if peer else None
        cn = subject_of(ssl.DER_cert_to_PEM_cert(der).encode())[0] if der else None
        body = {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "body": (await request.read()).decode(),
            "headers": dict(request.headers),
            "cn": cn,
        }
        return web.json_response(body, status=int(request.query.get("status", "200")),
                                 headers={"X-Upstream": "yes", "Audit-Id": "abc"})

    async def create(request: web.Request) -> web.Response:
        state.seen.append((request.method, request.path_qs))
        obj = await request.json()
        name = obj["metadata"]["name"]
        if name in state.configmaps:
            return web.json_response({"kind": "Status", "code": 409, "reason": "AlreadyExists",
                                      "message": f"{name} exists"}, status=409)
        obj["metadata"]["resourceVersion"] = str(len(state.configmaps) + 1)
        state.configmaps[name] = obj
        return web.json_response(obj, status=201)

    async def list_or_watch(request: web.Request) -> web.StreamResponse:
        state.seen.append((request.method, request.path_qs))
        if request.query.get("watch") not in ("true", "1"):
            return web.json_response({"kind": "ConfigMapList", "metadata": {"resourceVersion": "7"},
                                      "items": list(state.configmaps.values())})
        answer = web.StreamResponse(headers={"Content-Type": "application/json"})
        await answer.prepare(request)
        try:
            for i in range(int(request.query.get("n", "3"))):
                meta = {"name": f"cm-{i}", "resourceVersion": str(i)}
                event = {"type": "ADDED", "object": {"metadata": meta}}
                await answer.write(json.dumps(event).encode() + b"\n")
                await asyncio.sleep(0.01)
            if request.query.get("hold", "1") == "1":
                await asyncio.sleep(3600)  # like a real watch: open until the client or proxy ends it
            await answer.write_eof()
            return answer
        finally:
            state.streams_ended += 1

    async def chunked(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse(headers={"Content-Type": "text/plain"})
        answer.enable_chunked_encoding()
        await answer.prepare(request)
        await answer.write(b"first\n")
        await state.gate.wait()
        await answer.write(b"second\n")
        await answer.write_eof()
        return answer

    app = web.Application()
    app.router.add_post(CMS, create)
    app.router.add_get(CMS, list_or_watch)
    app.router.add_get("/chunked", chunked)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    return app


@pytest.fixture
async def upstream(pki: Path) -> AsyncIterator[Upstream]:
    state = Upstream()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    ctx.verify_mode = ssl.CERT_OPTIONAL  # the token-only user has no certificate
    runner = web.AppRunner(_app(state), handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    state.port = runner.addresses[0][1]
    yield state
    await runner.cleanup()


@pytest.fixture
def upstream_kubeconfig(pki: Path, upstream: Upstream, tmp_path: Path) -> Path:
    return _kubeconfig(pki, upstream.port, tmp_path / "upstream.kubeconfig")


@pytest.fixture
async def proxy(upstream_kubeconfig: Path) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(upstream_kubeconfig, seed=1) as p:
        yield p


@pytest.fixture
async def kube(proxy: FaultProxy, tmp_path: Path) -> AsyncIterator[KubeClient]:
    async with KubeClient(KubeConfig.from_file(proxy.kubeconfig(tmp_path / "proxy.kubeconfig")), FAST) as k:
        yield k


@pytest.fixture
async def http(proxy: FaultProxy) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(proxy.url) as session:
        yield session


def _cm(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}}


# ------------------------------------------------------------------------------------------------ passthrough


async def test_requests_and_answers_pass_through_with_the_kubeconfig_identity(
    http: aiohttp.ClientSession, proxy: FaultProxy
) -> None:
    async with http.put(
        "/echo/a%2Fb?labelSelector=app%3Dx&limit=5",
        data=b'{"x": 1}',
        headers={"Content-Type": "application/merge-patch+json", "Accept": "application/json",
                 "Authorization": "Bearer from-client", "Connection": "keep-alive, X-Hop", "X-Hop": "no"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Upstream"] == "yes" and resp.headers["Audit-Id"] == "abc"
        got = await resp.json()
    assert got["method"] == "PUT"
    assert got["path"] == "/echo/a/b" and got["query"] == "labelSelector=app%3Dx&limit=5"  # encoding kept
    assert got["body"] == '{"x": 1}'
    assert got["headers"]["Content-Type"] == "application/merge-patch+json"
    assert got["headers"]["Accept"] == "application/json"
    assert got["headers"]["Authorization"] == "Bearer from-client"
    assert "X-Hop" not in got["headers"]  # named in Connection: hop-by-hop
    assert got["cn"] == "admin"
    async with http.delete("/echo/x?status=404") as resp:
        assert resp.status == 404
    [put, delete] = proxy.requests
    assert (put.method, put.path, put.query, put.status, put.upstream_status, put.fault, put.watch) == (
        "PUT", "/echo/a/b", "labelSelector=app%3Dx&limit=5", 200, 200, None, False)
    assert (delete.method, delete.status) == ("DELETE", 404)


@pytest.mark.parametrize(
    ("user", "cn", "auth"), [("viewer", "viewer", None), ("robot", None, "Bearer s3cret")]
)
async def test_the_proxy_acts_as_the_user_named(
    upstream_kubeconfig: Path, user: str, cn: str | None, auth: str | None
) -> None:
    async with FaultProxy(upstream_kubeconfig, user=user) as proxy, aiohttp.ClientSession(proxy.url) as http:
        assert proxy.namespace == "team-a"
        async with http.get("/echo/who") as resp:
            got = await resp.json()
    assert got["cn"] == cn
    assert got["headers"].get("Authorization") == auth


def test_an_unknown_user_is_refused(upstream_kubeconfig: Path) -> None:
    with pytest.raises(ValueError, match="no user 'nobody'"):
        FaultProxy(upstream_kubeconfig, user="nobody")


async def test_kube_client_works_through_the_proxy_kubeconfig(
    kube: KubeClient, proxy: FaultProxy, upstream: Upstream, tmp_path: Path
) -> None:
    config = KubeConfig.from_file(proxy.kubeconfig(tmp_path / "k"))
    assert config.server == proxy.url and config.ca_file is None and config.namespace == "team-a"
    created = await kube.create(CMS, _cm("one"))
    assert created["metadata"]["resourceVersion"] == "1"
    listed = await kube.list(CMS)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["one"]
    assert proxy.count("POST", CMS, 201) == 1 and proxy.count("GET", CMS, 200, watch=False) == 1


async def test_a_chunked_answer_streams_through_unbuffered(
    http: aiohttp.ClientSession, upstream: Upstream
) -> None:
    async with http.get("/chunked") as resp:
        # the upstream holds its answer open until the first line has reached the client
        first = await asyncio.wait_for(resp.content.readline(), timeout=2)
        assert first == b"first\n"
        upstream.gate.set()
        assert await resp.content.read() == b"second\n"


async def test_an_unreachable_upstream_is_a_502(pki: Path, tmp_path: Path) -> None:
    from fleetlet.localcluster.cluster import free_port

    kubeconfig = _kubeconfig(pki, free_port(), tmp_path / "dead.kubeconfig")
    async with FaultProxy(kubeconfig) as proxy, aiohttp.ClientSession(proxy.url) as http:
        async with http.get("/echo/x") as resp:
            assert resp.status == 502
            assert (await resp.json())["kind"] == "Status"


# ------------------------------------------------------------------------------------------------ faults


async def test_a_500_once_is_retried_by_the_client(
    kube: KubeClient, proxy: FaultProxy, upstream: Upstream
) -> None:
    rule = proxy.add(Respond(500), method="GET", path=f"{CMS}$", times=1)
    assert (await kube.list(CMS))["kind"] == "ConfigMapList"
    assert rule.hits == 1 and proxy.faults_hit == {rule.name: 1}
    assert [(r.status, r.fault, r.upstream_status) for r in proxy.requests] == [
        (500, rule.name, None), (200, None, 200)
    ]
    assert upstream.saw("GET", CMS) == 1  # the faulted one never reached it


@pytest.mark.parametrize(
    ("status", "reason"), [(409, "Conflict"), (503, "ServiceUnavailable"), (410, "Expired")]
)
async def test_a_status_reaches_the_caller_as_an_api_error(
    kube: KubeClient, proxy: FaultProxy, status: int, reason: str
) -> None:
    proxy.add(Respond(status), path="^/echo/")  # unlimited
    with pytest.raises(ApiError) as err:
        await kube.get("/echo/x")
    assert (err.value.status, err.value.reason) == (status, reason)
    assert err.value.message == "injected by FaultProxy"
    assert proxy.count(status=status) == (FAST.attempts if status >= 500 else 1)


async def test_429_carries_retry_after_and_the_client_waits_it_out(
    kube: KubeClient, proxy: FaultProxy, http: aiohttp.ClientSession
) -> None:
    proxy.add(Respond(429, retry_after_s=1), method="GET", path="^/echo/", times=2)
    async with http.get("/echo/raw") as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["details"] == {"retryAfterSeconds": 1}
    started = time.monotonic()
    await kube.get("/echo/x")
    assert time.monotonic() - started >= 0.95
    assert proxy.count("GET", "^/echo/x$", 429) == 1 and proxy.count("GET", "^/echo/x$", 200) == 1


async def test_drop_before_forwarding_never_reaches_the_upstream(
    kube: KubeClient, proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.add(Drop(), method="POST", times=1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await kube.request("POST", CMS, body=_cm("a"), retry=NO_RETRY)
    assert upstream.saw("POST", CMS) == 0 and upstream.configmaps == {}
    [dropped] = proxy.requests
    assert (dropped.status, dropped.upstream_status) == (0, None)
    await kube.create(CMS, _cm("a"))  # times=1: the next one goes through
    assert list(upstream.configmaps) == ["a"]


async def test_drop_after_forwarding_applies_the_write_but_the_client_never_hears(
    kube: KubeClient, proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.add(Drop(after_forward=True), method="POST", times=1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await kube.request("POST", CMS, body=_cm("a"), retry=NO_RETRY)
    assert list(upstream.configmaps) == ["a"]  # the write happened
    assert [(r.status, r.upstream_status) for r in proxy.requests] == [(0, 201)]
    with pytest.raises(ApiError) as err:  # so a caller that retries must be idempotent
        await kube.create(CMS, _cm("a"))
    assert err.value.status == 409


async def test_delay_holds_the_request_before_forwarding(kube: KubeClient, proxy: FaultProxy) -> None:
    proxy.add(Delay(0.4), path="^/echo/slow", times=1)
    started = time.monotonic()
    await kube.get("/echo/slow")
    assert time.monotonic() - started >= 0.4
    started = time.monotonic()
    await kube.get("/echo/fast")
    await kube.get("/echo/slow")
    assert time.monotonic() - started < 0.4


async def test_a_delay_beyond_the_client_timeout_is_a_timeout(kube: KubeClient, proxy: FaultProxy) -> None:
    proxy.add(Delay(5), path="^/echo/")
    with pytest.raises(TimeoutError):
        await kube.request("GET", "/echo/x", retry=RetryPolicy(attempts=1, timeout_s=0.3))
    await asyncio.sleep(0.1)  # the proxy notices the client went away
    assert [r.status for r in proxy.requests] == [0]


async def test_rules_match_method_path_and_watch(kube: KubeClient, proxy: FaultProxy) -> None:
    proxy.add(Respond(503), method="DELETE", path="^/echo/")
    proxy.add(Respond(409), path="^/echo/only-this$")
    proxy.add(Respond(404), path="^/echo/", watch=True)
    proxy.add(Respond(400), path="^/echo/never", watch=False)
    assert (await kube.get("/echo/other"))["method"] == "GET"
    with pytest.raises(ApiError, match="409"):
        await kube.get("/echo/only-this")
    with pytest.raises(ApiError, match="503"):
        await kube.request("DELETE", "/echo/other", retry=NO_RETRY)
    with pytest.raises(ApiError, match="404"):
        async for _ in kube.watch("/echo/w"):
            pass
    with pytest.raises(ApiError, match="400"):
        await kube.get("/echo/never")


async def test_times_probability_and_removal(upstream_kubeconfig: Path) -> None:
    async def pattern(seed: int) -> list[int]:
        proxy = FaultProxy(upstream_kubeconfig, seed=seed)
        async with proxy, aiohttp.ClientSession(proxy.url) as http:
            rule = proxy.add(Respond(500), probability=0.5)
            statuses = []
            for _ in range(40):
                async with http.get("/echo/x") as resp:
                    statuses.append(resp.status)
            assert rule.hits == statuses.count(500) == proxy.count(status=500, fault=rule.name)
            proxy.remove(rule)
            async with http.get("/echo/x") as resp:
                assert resp.status == 200
            return statuses

    first = await pattern(seed=3)
    assert 8 <= first.count(500) <= 32
    assert await pattern(seed=3) == first  # seeded: the same faults again
    assert await pattern(seed=4) != first


async def test_times_limits_a_rule_and_the_first_matching_rule_wins(
    http: aiohttp.ClientSession, proxy: FaultProxy
) -> None:
    twice = proxy.add(Respond(503), times=2, name="twice")
    always = proxy.add(Respond(409), name="always")
    statuses = []
    for _ in range(4):
        async with http.get("/echo/x") as resp:
            statuses.append(resp.status)
    assert statuses == [503, 503, 409, 409]
    assert proxy.faults_hit == {"twice": 2, "always": 2} and (twice.hits, always.hits) == (2, 2)
    assert proxy.count(fault=True) == 4 and proxy.count(fault=False) == 0 and proxy.count(fault="twice") == 2
    proxy.clear()
    async with http.get("/echo/x") as resp:
        assert resp.status == 200
    assert proxy.count(fault=False) == 1 and proxy.rules == []
    with pytest.raises(ValueError):
        proxy.add(Respond(500), probability=1.5)


# ------------------------------------------------------------------------------------------------ watches


async def _names(kube: KubeClient, **params: Any) -> list[str]:
    return [e.object["metadata"]["name"] async for e in kube.watch(CMS, timeout_s=5, **params)]


async def test_a_watch_streams_and_cut_watches_ends_it_cleanly(
    kube: KubeClient, proxy: FaultProxy, upstream: Upstream
) -> None:
    seen: list[str] = []
    three = asyncio.Event()

    async def consume() -> None:
        async for event in kube.watch(CMS, timeout_s=60):
            seen.append(event.object["metadata"]["name"])
            if len(seen) == 3:
                three.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(three.wait(), timeout=2)
    assert proxy.open_watches == 1
    assert proxy.cut_watches() == 1
    await asyncio.wait_for(task, timeout=2)  # ends normally: the caller re-watches
    assert seen == ["cm-0", "cm-1", "cm-2"] and proxy.open_watches == 0
    [watch] = proxy.requests
    assert (watch.watch, watch.status, watch.events) == (True, 200, 3)
    await asyncio.sleep(0.1)
    assert upstream.streams_ended == 1  # the upstream watch was closed too


async def test_cut_watches_abrupt_is_a_broken_stream(kube: KubeClient, proxy: FaultProxy) -> None:
    async def consume() -> None:
        async for _ in kube.watch(CMS, timeout_s=60):
            pass

    task = asyncio.create_task(consume())
    await proxy.wait_watches(1)
    proxy.cut_watches(abrupt=True)
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(task, timeout=2)


async def test_a_watch_that_ends_upstream_ends_downstream(kube: KubeClient, proxy: FaultProxy) -> None:
    assert await _names(kube, n="2", hold="0") == ["cm-0", "cm-1"]
    assert proxy.requests[0].events == 2


async def test_cut_watch_after_events_and_after_seconds(kube: KubeClient, proxy: FaultProxy) -> None:
    proxy.add(CutWatch(after_events=2), times=1)
    assert await _names(kube, n="5") == ["cm-0", "cm-1"]
    proxy.add(CutWatch(after_s=0.3), times=1)
    started = time.monotonic()
    assert await _names(kube, n="4") == ["cm-0", "cm-1", "cm-2", "cm-3"]
    assert 0.3 <= time.monotonic() - started < 2
    proxy.add(CutWatch(after_events=1, abrupt=True), times=1)
    with pytest.raises(aiohttp.ClientPayloadError):
        await _names(kube, n="3")
    assert proxy.count(watch=True, fault=True) == 3


async def test_a_cut_watch_rule_never_touches_other_requests(kube: KubeClient, proxy: FaultProxy) -> None:
    rule = proxy.add(CutWatch(after_events=0))
    await kube.list(CMS)
    assert rule.hits == 0


@pytest.mark.parametrize("in_stream", [False, True])
async def test_410_on_a_watch_either_way_is_an_api_error(
    kube: KubeClient, proxy: FaultProxy, http: aiohttp.ClientSession, in_stream: bool
) -> None:
    proxy.add(Respond(410, in_stream=in_stream), path=CMS, watch=True, times=2)
    async with http.get(CMS, params={"watch": "1"}) as resp:
        raw = await resp.read()
    if in_stream:
        assert resp.status == 200
        event = json.loads(raw)
        assert event["type"] == "ERROR" and event["object"]["code"] == 410
    else:
        assert resp.status == 410 and json.loads(raw)["reason"] == "Expired"
    with pytest.raises(ApiError) as err:
        await _names(kube, resourceVersion="1")
    assert err.value.gone
    await kube.list(CMS)  # the list is no watch: untouched
    assert proxy.count(fault=True) == 2


async def test_stop_ends_open_watches(upstream_kubeconfig: Path, tmp_path: Path) -> None:
    proxy = FaultProxy(upstream_kubeconfig)
    await asyncio.to_thread(proxy.start)
    async with KubeClient(KubeConfig.from_file(proxy.kubeconfig(tmp_path / "k")), NO_RETRY) as kube:
        task = asyncio.create_task(_names(kube))
        await proxy.wait_watches(1)
        started = time.monotonic()
        await asyncio.to_thread(proxy.stop)
        assert time.monotonic() - started < 3
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(task, timeout=2)
    with pytest.raises(RuntimeError, match="not started"):
        FaultProxy(upstream_kubeconfig).kubeconfig(tmp_path / "never")


def test_sync_context_manager(upstream_kubeconfig: Path) -> None:
    with FaultProxy(upstream_kubeconfig) as proxy:
        assert proxy.url.startswith("http://127.0.0.1:")
    proxy.stop()  # idempotent


async def test_stop_and_start_again_is_an_outage_on_the_same_address(
    upstream_kubeconfig: Path, tmp_path: Path
) -> None:
    proxy = FaultProxy(upstream_kubeconfig)
    async with proxy, KubeClient(KubeConfig.from_file(proxy.kubeconfig(tmp_path / "k")), FAST) as kube:
        await kube.get("/echo/before")
        url = proxy.url
        await asyncio.to_thread(proxy.stop)
        with pytest.raises(aiohttp.ClientConnectionError):
            await kube.request("GET", "/echo/down", retry=NO_RETRY)
        await asyncio.to_thread(proxy.start)
        assert proxy.url == url
        await kube.get("/echo/after")
    assert [r.path for r in proxy.requests] == ["/echo/before", "/echo/after"]


async def test_a_partial_drop_truncates_the_answer_after_the_upstream_acted(
    http: aiohttp.ClientSession, proxy: FaultProxy, upstream: Upstream
) -> None:
    proxy.add(Drop(after_forward=True, partial=True), method="POST", times=1)
    async with http.post(CMS, json=_cm("half")) as resp:
        assert resp.status == 201  # the status and headers arrived, the body never completes
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert list(upstream.configmaps) == ["half"]
    assert [(r.status, r.upstream_status) for r in proxy.requests] == [(0, 201)]
