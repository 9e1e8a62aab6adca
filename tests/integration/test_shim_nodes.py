"""The shim against the real control plane: cars become Ready Nodes with the right capacity, labels, taint and
a renewed Lease; a car that goes away is marked NotReady and tainted by the real node lifecycle controller; a
forged message from one car about another changes nothing."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fleetlet_car.link import CarLink, car_ssl_context

from fleetlet.carlink import protocol
from fleetlet.carlink.protocol import Capacity
from fleetlet.cli.local import ShimHandle, apply_objects, start_shim, vehiclenodes
from tests.conftest import until
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shim(crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShimHandle]:
    yield from start_shim(crds_installed, tmp_path_factory.mktemp("shim"))


def _link(shim: ShimHandle, body: dict[str, Any]) -> CarLink:
    name = body["metadata"]["name"]
    crt, key = shim.car_cert(name)
    hw = body["spec"]["hardware"]
    return CarLink(
        shim.link_url, name, car_ssl_context(shim.fleet_ca_file, crt, key),
        agent_version="test-car/1", runtimes=["onnx"], providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        capacity=Capacity(cpu=hw["cpu"], memory=hw["memory"], accelerators=hw.get("accelerators", [])),
    )


async def _connect(links: list[CarLink]) -> None:
    for link in links:
        link.start()
    await asyncio.wait_for(asyncio.gather(*(link.connected.wait() for link in links)), timeout=60)


def _nodes(cluster: Cluster, prefix: str) -> dict[str, dict[str, Any]]:
    items = json.loads(cluster.kubectl("get", "nodes", "-l", "fleetlet.io/vehicle=true", "-o", "json").stdout)
    return {n["metadata"]["name"]: n for n in items["items"] if n["metadata"]["name"].startswith(prefix)}


def _ready(node: dict[str, Any]) -> str:
    return next((c["status"] for c in node["status"].get("conditions", []) if c["type"] == "Ready"), "Unknown")


@pytest.fixture
async def fifty(crds_installed: Cluster, shim: ShimHandle) -> AsyncIterator[tuple[list[dict[str, Any]], list[CarLink]]]:
    bodies = vehiclenodes(50, seed=7, prefix="fifty")
    apply_objects(crds_installed, bodies)
    links = [_link(shim, b) for b in bodies]
    await _connect(links)
    yield bodies, links
    await asyncio.gather(*(link.close() for link in links))


async def test_fifty_cars_become_ready_nodes(crds_installed: Cluster, shim: ShimHandle, fifty: Any) -> None:
    bodies, _ = fifty
    nodes = await until(
        "50 car Nodes are Ready",
        lambda: (n := _nodes(crds_installed, "fifty-")) and len(n) == 50
        and all(_ready(x) == "True" for x in n.values()) and n,
        timeout_s=90,
    )
    for body in bodies:
        node = nodes[body["metadata"]["name"]]
        hw = body["spec"]["hardware"]
        cap = node["status"]["capacity"]
        assert cap["cpu"] == hw["cpu"] and cap["memory"] == hw["memory"]
        accelerators = sum(a["count"] for a in hw["accelerators"])
        # Advertised because these cars' runtimes say they offer CUDA (see _link); a car without an
        # accelerator provider advertises none, whatever its hardware.
        assert cap.get("fleetlet.io/accelerator", "0") == str(accelerators)
        assert node["status"]["allocatable"] == cap
        labels = node["metadata"]["labels"]
        assert labels["fleetlet.io/vehicle"] == "true"
        assert labels["topology.kubernetes.io/region"] == body["spec"]["region"]
        assert labels["fleetlet.io/accelerator"] == (hw["accelerators"][0]["type"] if accelerators else "none")
        taints = {(t["key"], t["effect"]) for t in node["spec"].get("taints", [])}
        assert ("fleetlet.io/vehicle", "NoSchedule") in taints
        assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] > 0
        assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("fleetlet-onnx")
        # Deleting the VehicleNode deletes the Node (garbage collection through the owner reference).
        assert node["metadata"]["ownerReferences"][0]["kind"] == "VehicleNode"

    lease_name = bodies[0]["metadata"]["name"]

    def renew_time() -> datetime:
        lease = json.loads(crds_installed.kubectl("get", "lease", "-n", "kube-node-lease", lease_name,
                                                  "-o", "json").stdout)
        assert lease["spec"]["holderIdentity"] == lease_name
        return datetime.strptime(lease["spec"]["renewTime"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)

    def lease_exists() -> bool:
        return crds_installed.kubectl("get", "lease", "-n", "kube-node-lease", lease_name, check=False).returncode == 0

    # A new car's Lease is created by its first renewal, within one renewal interval of registration.
    await until("the car's Lease exists", lease_exists, timeout_s=20)
    first = renew_time()
    await until("the Lease is renewed", lambda: renew_time() > first, timeout_s=20)
    metrics = shim.metrics()
    assert metrics["fleetlet_shim_cars_connected"] >= 50
    assert metrics["fleetlet_shim_nodes_ready"] >= 50


async def test_a_car_that_goes_away_is_marked_not_ready_by_the_controller_manager(
    crds_installed: Cluster, shim: ShimHandle
) -> None:
    body = vehiclenodes(1, seed=8, prefix="leaver")[0]
    name = body["metadata"]["name"]
    apply_objects(crds_installed, [body])
    link = _link(shim, body)
    await _connect([link])
    await until("the car's Node is Ready", lambda: _ready(_nodes(crds_installed, name).get(name, {"status": {}})) == "True",
                 timeout_s=30)
    await link.close()

    def tainted() -> bool:
        node = _nodes(crds_installed, name)[name]
        keys = {t["key"] for t in node["spec"].get("taints", [])}
        return _ready(node) != "True" and bool(keys & {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"})

    # The shim stops renewing the Lease and reports the link loss; the node lifecycle controller taints the Node.
    await until("the controller-manager taints the Node NotReady", tainted, timeout_s=60)
    node = _nodes(crds_installed, name)[name]
    assert ("fleetlet.io/vehicle", "NoSchedule") in {(t["key"], t["effect"]) for t in node["spec"]["taints"]}


async def test_a_forged_message_about_another_car_is_refused(crds_installed: Cluster, shim: ShimHandle,
                                                             tmp_path: Path) -> None:
    alice, bob = vehiclenodes(2, seed=9, prefix="forge")
    apply_objects(crds_installed, [alice, bob])
    bob_link = _link(shim, bob)
    await _connect([bob_link])
    a_name, b_name = alice["metadata"]["name"], bob["metadata"]["name"]
    crt, key = shim.car_cert(a_name)
    ctx: ssl.SSLContext = car_ssl_context(shim.fleet_ca_file, crt, key)
    hw = alice["spec"]["hardware"]
    hello = protocol.Hello(car=a_name, seq=1, agent_version="forger/1", runtimes=["onnx"],
                           capacity=Capacity(cpu=hw["cpu"], memory=hw["memory"]))

    def telemetry(car: str, seq: int, soc: float) -> str:
        return json.dumps({"type": "telemetry", "car": car, "seq": seq, "telemetry": {
            "stateOfCharge": soc, "pluggedIn": True, "charging": False, "driveState": "Driving",
            "batteryTemperatureC": 20.0, "computeTemperatureC": 30.0, "linkQuality": 1.0,
            "observedAt": datetime.now(UTC).isoformat()}})

    async with aiohttp.ClientSession() as session, session.ws_connect(shim.link_url, ssl=ctx) as ws:
        await ws.send_str(protocol.encode(hello))
        welcome = json.loads((await ws.receive(timeout=10)).data)
        assert welcome["type"] == "welcome" and welcome["car"] == a_name
        assert json.loads((await ws.receive(timeout=10)).data)["type"] == "policy"  # her owner's rules
        await ws.send_str(telemetry(b_name, 2, 0.11))  # alice pretends to be bob
        refusal = json.loads((await ws.receive(timeout=10)).data)
        assert refusal["type"] == "error" and refusal["code"] == "wrongCar"
        await ws.send_str(telemetry(a_name, 3, 0.77))  # the link is still up for alice's own messages

        def soc(name: str) -> float | None:
            vn = json.loads(crds_installed.kubectl("get", "vn", name, "-o", "json").stdout)
            return vn.get("status", {}).get("telemetry", {}).get("stateOfCharge")

        await until("alice's own telemetry is mirrored", lambda: soc(a_name) == 0.77, timeout_s=20)
        assert soc(b_name) != 0.11, "a forged report changed another car's status"
    assert shim.metrics()['fleetlet_shim_link_messages_refused_total{reason="wrongCar"}'] >= 1.0
    await bob_link.close()
