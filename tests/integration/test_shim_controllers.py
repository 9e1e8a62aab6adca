"""The shim's controllers lose nothing: proven against the real control plane, with the shim talking to it
through a fault-injecting proxy (errors, 429s, dropped connections, slow answers, expired watches) and cars under
the test's exact control (``ScriptedCar``).

Each test names the failure the old shim had and shows the new one recovering from it: a final status that
could not be written is written later (and only then acked to the car); a registration that failed is retried;
a stop is sent again until the car acts, and a car that never confirms does not hold a deletion forever; a pod
deleted while its car was away is stopped when the car returns; a relist after an expired watch notices what
vanished; a deleted VehicleNode stops its Lease and telemetry writes; a SIGKILLed shim loses nothing and runs
nothing twice. Also: replicas split one fleet (redirects, no overlap, no gap); revoked credentials hold across a
restart and for every replica; the RBAC the shim gets is the RBAC it needs; its listeners and health endpoints.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from fleetlet.api.v1alpha1.shard import ShardAssignment
from fleetlet.carlink.protocol import HeldAssignment, Redirect
from fleetlet.cli.local import (
    SHIM_NAMESPACE,
    FleetCredentials,
    ShimHandle,
    apply_objects,
    launch_shim,
    vehiclenodes,
)
from fleetlet.localcluster.cluster import free_port
from tests.conftest import until
from tests.faultproxy import Delay, Drop, FaultProxy, Respond
from tests.integration.conftest import Cluster, get_pod, pod_phase
from tests.integration.scripted_car import ScriptedCar

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
NS = "default"
DIGEST = "c" * 64
FAST = ["--reconnect-grace-seconds", "1", "--stop-resend-seconds", "2", "--deletion-slack-seconds", "2",
        "--pod-progress-seconds", "1"]


@pytest.fixture(scope="module")
def proxy(crds_installed: Cluster) -> Iterator[FaultProxy]:
    assert crds_installed.local is not None
    upstream = crds_installed.local.user_kubeconfig("fleetlet-shim")
    with FaultProxy(upstream) as p:
        yield p


@pytest.fixture(scope="module")
def shim(crds_installed: Cluster, proxy: FaultProxy, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[ShimHandle]:
    work = tmp_path_factory.mktemp("shim-ctl")
    handle = launch_shim(crds_installed, work, lease_renew_s=2.0, kubeconfig=proxy.kubeconfig(work / "proxy.kubeconfig"),
                         extra_args=FAST)
    yield handle
    handle.stop()


def _cars(cluster: Cluster, prefix: str, n: int = 1) -> list[dict[str, Any]]:
    bodies = vehiclenodes(n, seed=7, prefix=prefix)
    for body in bodies:  # lend every car any time: these tests are about the shim, not the owner's rules
        body["spec"]["policy"].update({"requirePluggedIn": False, "minStateOfCharge": 0.3, "availability": []})
    apply_objects(cluster, bodies)
    return bodies


@pytest_asyncio.fixture(loop_scope="module")
async def car(crds_installed: Cluster, shim: ShimHandle, request: pytest.FixtureRequest) -> AsyncIterator[ScriptedCar]:
    prefix = re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_").lower())[:40].strip("-")
    body = _cars(crds_installed, prefix)[0]
    c = ScriptedCar(shim, body["metadata"]["name"], body["spec"]["hardware"])
    await c.connect()
    await until("the car's Node is Ready", lambda: _ready(crds_installed, c.name), 30)
    yield c
    await c.close()


def _node(cluster: Cluster, name: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("get", "node", name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def _ready(cluster: Cluster, name: str) -> bool:
    node = _node(cluster, name)
    return node is not None and any(c["type"] == "Ready" and c["status"] == "True"
                                    for c in node["status"].get("conditions", []))


def _bind(cluster: Cluster, name: str, car: str, grace_s: int = 30) -> None:
    """A shard pod bound straight to ``car`` (these tests are about the shim, not the scheduler)."""
    assignment = ShardAssignment.model_validate({"model": {"sha256": DIGEST}, "input": {"sha256": DIGEST, "end": 10}})
    pod = assignment.apply_to_pod({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"nodeName": car, "runtimeClassName": "fleetlet-onnx", "restartPolicy": "Never",
                 "terminationGracePeriodSeconds": grace_s,
                 "tolerations": [{"key": "fleetlet.io/vehicle", "operator": "Exists"}],
                 "containers": [{"name": "shard", "image": "fleetlet.io/onnx"}]},
    })
    pod["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "1", "memory": "256Mi"}}
    apply_objects(cluster, [pod])


async def _running(cluster: Cluster, car: ScriptedCar, pod: str) -> str:
    """Bind ``pod`` to the car, wait for its assignment, report it Running; returns its uid."""
    _bind(cluster, pod, car.name)
    uid: str = (await car.wait_for_assign(pod)).uid
    await car.report(uid, "Running", items_done=1)
    await until(f"{pod} is Running", lambda: pod_phase(cluster, pod) == "Running", 30)
    return uid


# ---- nothing dropped on transient failures ---------------------------------------------------------------


async def test_a_final_status_whose_writes_fail_is_written_later_and_acked_only_then(
    crds_installed: Cluster, proxy: FaultProxy, car: ScriptedCar
) -> None:
    uid = await _running(crds_installed, car, "final-status")
    rule = proxy.add(Respond(500), method="PATCH", path=r"/pods/final-status/status$", times=12)
    await car.report(uid, "Succeeded", items_done=10, result=DIGEST)
    while rule.hits < 12:  # the old shim dropped the write here and the pod stayed Running forever
        assert not car.received("ack", uid), "the car was told to forget a status the API does not hold"
        await asyncio.sleep(0.2)
    await until("the pod succeeds after the API recovers", lambda: pod_phase(crds_installed, "final-status")
                == "Succeeded", 60)
    await car.wait_for("ack", uid, timeout_s=10)
    assert proxy.count("PATCH", r"/pods/final-status/status$", 500) == 12


async def test_a_registration_that_fails_is_retried_until_the_node_exists(
    crds_installed: Cluster, shim: ShimHandle, proxy: FaultProxy
) -> None:
    body = _cars(crds_installed, "register-fails")[0]
    rule = proxy.add(Respond(503), method="POST", path=r"^/api/v1/nodes$", times=8)
    c = ScriptedCar(shim, body["metadata"]["name"], body["spec"]["hardware"])
    await c.connect()
    try:
        await until("the car's Node is registered and Ready", lambda: _ready(crds_installed, c.name), 90)
        assert rule.hits == 8
    finally:
        await c.close()


async def test_dropped_answers_and_slow_answers_do_not_stop_leases_or_telemetry(
    crds_installed: Cluster, proxy: FaultProxy, car: ScriptedCar
) -> None:
    drop = proxy.add(Drop(after_forward=True), method="PATCH", path=rf"/leases/{car.name}$", times=3)
    slow = proxy.add(Delay(3.0), method="PATCH", path=rf"/vehiclenodes/{car.name}/status$", times=2)

    def drive() -> str | None:
        vn = json.loads(crds_installed.kubectl("get", "vn", car.name, "-o", "json").stdout)
        return vn.get("status", {}).get("telemetry", {}).get("driveState")  # type: ignore[no-any-return]

    for state in ("Driving", "Parked"):
        await car.telemetry(driveState=state)
        await until(f"{state} is mirrored despite slow answers", lambda s=state: drive() == s, 30)  # type: ignore[misc]
    await until("three lease answers were dropped", lambda: drop.hits == 3, 30)
    before = proxy.count("PATCH", rf"/leases/{car.name}$", 200)
    await until("renewals go on", lambda: proxy.count("PATCH", rf"/leases/{car.name}$", 200) > before + 1, 20)
    assert _ready(crds_installed, car.name) and slow.hits == 2


async def test_a_relist_after_an_expired_watch_notices_a_pod_deleted_meanwhile(
    crds_installed: Cluster, proxy: FaultProxy, car: ScriptedCar
) -> None:
    uid = await _running(crds_installed, car, "vanishes")
    blind = proxy.add(Drop(), path=r"^/api/v1/pods$", watch=True)  # the pod watch cannot come back
    proxy.cut_watches()
    await asyncio.sleep(0.5)
    crds_installed.kubectl("delete", "pod", "vanishes", "-n", NS, "--grace-period=0", "--force")
    lists = proxy.count("GET", r"^/api/v1/pods$", 200, watch=False)
    proxy.remove(blind)
    proxy.add(Respond(410, in_stream=True), path=r"^/api/v1/pods$", watch=True, times=1)  # too old: relist
    stop = await car.wait_for("stop", uid, timeout_s=60)
    assert stop.reason == "PodDeleted"
    assert proxy.count("GET", r"^/api/v1/pods$", 200, watch=False) > lists, "the shim relisted"


async def test_a_deleted_vehiclenode_stops_its_lease_and_telemetry_writes(
    crds_installed: Cluster, proxy: FaultProxy, car: ScriptedCar
) -> None:
    await until("its Lease is renewed", lambda: proxy.count("PATCH", rf"/leases/{car.name}$", 200) > 0, 20)
    crds_installed.kubectl("delete", "vn", car.name, "--wait=true")
    await asyncio.sleep(2)
    since = len(proxy.requests)
    await car.telemetry(driveState="Driving")
    await asyncio.sleep(6)  # three renewal intervals
    after = [r for r in proxy.requests[since:] if car.name in r.path and r.method != "GET"]
    assert after == [], [f"{r.method} {r.path}" for r in after]


# ---- stops and deletions -----------------------------------------------------------------------------------


async def test_a_stop_is_sent_again_and_a_car_that_never_confirms_does_not_hold_the_deletion(
    crds_installed: Cluster, car: ScriptedCar
) -> None:
    _bind(crds_installed, "unconfirmed", car.name, grace_s=3)
    uid = (await car.wait_for_assign("unconfirmed")).uid
    await car.report(uid, "Running")
    await until("Running", lambda: pod_phase(crds_installed, "unconfirmed") == "Running", 30)
    started = time.monotonic()
    crds_installed.kubectl("delete", "pod", "unconfirmed", "-n", NS, "--wait=false")
    await car.wait_for("stop", uid, timeout_s=10)
    await car.wait_for("stop", uid, timeout_s=10, count=2)  # the car said nothing: asked again
    await until("the deletion is finished without the car", lambda: get_pod(crds_installed, "unconfirmed") is None, 30)
    assert time.monotonic() - started >= 3, "not before the pod's grace period"


async def test_a_pod_deleted_while_its_car_was_away_is_stopped_when_the_car_returns(
    crds_installed: Cluster, car: ScriptedCar
) -> None:
    uid = await _running(crds_installed, car, "deleted-while-away")
    await car.disconnect()
    crds_installed.kubectl("delete", "pod", "deleted-while-away", "-n", NS, "--wait=false")
    await until("the deletion is finished (its car is gone)",
                lambda: get_pod(crds_installed, "deleted-while-away") is None, 30)
    await car.connect(held=[HeldAssignment(uid=uid, phase="Running", items_done=5)])
    stop = await car.wait_for("stop", uid, timeout_s=20)
    assert stop.reason == "PodNotFound"
    await car.report(uid, "Failed", reason="Stopped")
    await car.wait_for("ack", uid, timeout_s=10)  # and the car may forget it


async def test_a_sigkilled_shim_loses_nothing_and_runs_nothing_twice(
    crds_installed: Cluster, shim: ShimHandle, car: ScriptedCar
) -> None:
    uid = await _running(crds_installed, car, "survives-sigkill")
    other = await _running(crds_installed, car, "still-running")
    shim.kill()  # no shutdown code runs
    await car.disconnect()
    await asyncio.to_thread(shim.start_again)
    # The car finished one shard while the shim was dead and still runs the other.
    await car.connect(held=[HeldAssignment(uid=uid, phase="Succeeded", items_done=10, result_digest=DIGEST),
                            HeldAssignment(uid=other, phase="Running", items_done=3)])
    await car.report(uid, "Succeeded", items_done=10, result=DIGEST)  # the car re-sends its unacked final
    await until("the finished shard's pod succeeds", lambda: pod_phase(crds_installed, "survives-sigkill")
                == "Succeeded", 30)
    await car.wait_for("ack", uid, timeout_s=10)
    await asyncio.sleep(3)
    assert len(car.received("assign", uid)) == 1 and len(car.received("assign", other)) == 1, \
        "a restarted shim must not hand the car work it already holds"
    assert not car.received("stop", other) and pod_phase(crds_installed, "still-running") == "Running"


# ---- replicas, revocation, RBAC, listeners -----------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas(crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ShimHandle]]:
    work = tmp_path_factory.mktemp("replicas")
    creds = FleetCredentials.create(work)
    ports = [free_port(), free_port()]
    handles: list[ShimHandle] = []
    try:
        for r in (0, 1):
            handles.append(launch_shim(crds_installed, work / f"r{r}", lease_renew_s=3.0, credentials=creds,
                                       artifact_dir=work / "artifacts", replica=r, replicas=2, link_ports=ports))
        yield handles
    finally:
        for h in handles:
            h.stop()


async def _connect_following_redirects(car: ScriptedCar) -> int:
    """Dial the car's URL; on a redirect, dial where it says. Returns how many redirects it followed."""
    followed = 0
    while True:
        await car.connect(expect_welcome=False)
        first = await car.wait_for_any(("welcome", "redirect"), timeout_s=20)
        if isinstance(first, Redirect):
            followed += 1
            await car.disconnect()
            car.url = first.url
            car.inbox.clear()
            continue
        await car.telemetry()
        return followed


async def test_two_replicas_split_one_fleet_with_no_overlap_and_no_gap(
    crds_installed: Cluster, replicas: list[ShimHandle]
) -> None:
    from fleetlet_shim import sharding

    bodies = _cars(crds_installed, "split", n=10)
    cars = [ScriptedCar(replicas[0], b["metadata"]["name"], b["spec"]["hardware"]) for b in bodies]
    try:
        redirected = [await _connect_following_redirects(c) for c in cars]  # every car dials replica 0 first
        owners = {c.name: sharding.owner(c.name, 2) for c in cars}
        assert sum(redirected) == sum(1 for o in owners.values() if o == 1) > 0
        await until("every car's Node is Ready", lambda: all(_ready(crds_installed, c.name) for c in cars), 60)
        for c in cars:
            node = _node(crds_installed, c.name)
            assert node is not None and node["metadata"]["labels"]["fleetlet.io/shim"] == f"shim-test-{owners[c.name]}"
        connected = [h.metrics().get("fleetlet_shim_cars_connected", 0) for h in replicas]
        expected = [sum(1 for o in owners.values() if o == r) for r in (0, 1)]
        await until("each replica counts exactly its own cars", lambda: [
            h.metrics().get("fleetlet_shim_cars_connected", 0) for h in replicas] == expected, 10)
        assert sum(connected) <= len(cars)
    finally:
        for c in cars:
            await c.close()


async def test_a_revoked_car_is_cut_off_refused_after_a_restart_and_by_every_replica(
    crds_installed: Cluster, shim: ShimHandle, replicas: list[ShimHandle]
) -> None:
    body = _cars(crds_installed, "revoked")[0]
    car = ScriptedCar(shim, body["metadata"]["name"], body["spec"]["hardware"])
    await car.connect()
    try:
        apply_objects(crds_installed, [{"apiVersion": "v1", "kind": "ConfigMap",
                                        "metadata": {"name": "fleetlet-car-revocations", "namespace": SHIM_NAMESPACE},
                                        "data": {"cars": f"{car.name}\n"}}])
        # (The close code, 4003, races with aiohttp closing the socket, so the test asserts the refusal below.)
        await until("the live link is closed", lambda: car.closed_with is not None, 20)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await car.connect(expect_welcome=False)
        assert refused.value.status == 403
        await asyncio.to_thread(shim.restart)
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await car.connect(expect_welcome=False)
        for replica in replicas:  # the list lives in the API, so every replica holds it
            other = ScriptedCar(replica, car.name, body["spec"]["hardware"])
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await other.connect(expect_welcome=False)
            await other.close()
    finally:
        crds_installed.kubectl("delete", "configmap", "fleetlet-car-revocations", "-n", SHIM_NAMESPACE,
                               "--ignore-not-found")
        await car.close()


async def test_a_verb_missing_from_the_shims_rbac_fails_visibly(
    crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.mktemp("no-lease-rbac")
    handle = await asyncio.to_thread(launch_shim, crds_installed, work, lease_renew_s=2.0,
                                     user="fleetlet-shim-nolease", rbac_drop=(("leases", "create"),
                                                                                 ("leases", "patch")))
    body = _cars(crds_installed, "no-lease")[0]
    car = ScriptedCar(handle, body["metadata"]["name"], body["spec"]["hardware"])
    try:
        await car.connect()

        def refused() -> float:
            m = handle.metrics()
            return sum(v for k, v in m.items() if k.startswith("fleetlet_shim_api_calls_total")
                       and 'resource="leases"' in k and 'code="403"' in k)

        await until("the API server refuses its Lease writes", lambda: refused() > 0, 30)
        lease = crds_installed.kubectl("get", "lease", car.name, "-n", "kube-node-lease", check=False)
        assert lease.returncode != 0 and "NotFound" in lease.stderr  # the car has no heartbeat at all
        assert "lease renewal failed" in handle.log_tail(200)
    finally:
        await car.close()
        handle.stop()


def _listening(pid: int) -> set[str]:
    """The local addresses of the TCP sockets process ``pid`` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                host, port = cols[1].split(":")
                addr = ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0)) if len(host) == 8 else host
                out.add(f"{addr}:{int(port, 16)}")
    return out


def test_every_listener_is_bound_to_its_address_and_health_needs_no_credentials(shim: ShimHandle) -> None:
    listening = _listening(shim.process.pid)
    assert len(listening) == 3, listening  # car link + artifacts, kubelet API, metrics
    assert all(a.startswith("127.0.0.1:") for a in listening), listening
    import urllib.request

    for path in ("/healthz", "/readyz"):
        assert urllib.request.urlopen(shim.metrics_url.replace("/metrics", path), timeout=5).status == 200
    metrics = shim.metrics()
    assert metrics["process_resident_memory_bytes"] > 0 and "process_cpu_seconds_total" in metrics
