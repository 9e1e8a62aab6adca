"""Car state becomes scheduling: the owner's rules, applied by the shim as Node taints, labels and a cordon, decide
where the real kube-scheduler puts shard pods and which pods the real taint-eviction controller removes.

Everything runs for real: kube-apiserver + etcd + kube-scheduler + kube-controller-manager v1.37.2 on loopback
(node-monitor grace 20 s), one fleetlet-shim process for the module, a small SIMULATED fleet of real car agents
(real links, safety reflex, sandboxed ONNX runtime running the digits model) and protocol-level ``ScriptedCar``s
where a test needs exact control of what a car says. Pods are built as the operator builds them (RuntimeClass
``fleetlet-onnx``, the ``ShardAssignment`` via ``apply_to_pod``, the operator's not-ready/unreachable tolerations)
and placed by the real scheduler; a ``nodeSelector`` on ``kubernetes.io/hostname`` keeps each on the car under test.

What each test proves is in its name. A ``NodeLog`` watches every version of every car Node the API server
stores, so "a foreign taint survives every Fleetlet write" is checked on every write, not on a sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import pytest_asyncio
from fleetlet_car.agent import AgentConfig
from fleetlet_car.sim.runner import SimFleetHarness

from fleetlet.api.v1alpha1 import Telemetry, VehicleNodeSpec
from fleetlet.api.v1alpha1 import taints as tk
from fleetlet.api.v1alpha1.shard import ShardAssignment, ShardResources
from fleetlet.api.v1alpha1.vehiclenode import Policy
from fleetlet.cli.local import ShimHandle, apply_objects, start_shim, vehiclenodes
from fleetlet.kube import ApiError, KubeClient, KubeConfig, resource_path
from fleetlet.policy import CarPolicy, evaluate
from tests.conftest import until
from tests.integration.conftest import Cluster, dead_or_dying, get_pod, pod_phase
from tests.integration.scripted_car import PARKED, ScriptedCar

# The cars live on one event loop for the whole module, like a fleet simulator process.
pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
NS = "default"
BERLIN = ZoneInfo("Europe/Berlin")
USER_TAINT = ("example.com/x", "y", "NoSchedule")

# Cars with real agents, one per scenario, each named for what it is used for.
AGENT_CARS = ("cs-battery", "cs-plugonly", "cs-floor", "cs-thermal", "cs-driver")


# ---- watching every version of every car Node ----------------------------------------------------------------


@dataclass(frozen=True)
class NodeVersion:
    at: float  # time.monotonic() when the watch delivered it
    rv: str
    taints: frozenset[tuple[str, str | None, str]]  # (key, value, effect)
    labels: dict[str, str]
    unschedulable: bool
    annotations: dict[str, str]
    ready: str | None

    def has(self, key: str, value: str | None = None, effect: str | None = None) -> bool:
        return any(k == key and (value is None or v == value) and (effect is None or e == effect)
                   for k, v, e in self.taints)

    def keys(self) -> set[str]:
        return {k for k, _, _ in self.taints}


@dataclass
class NodeLog:
    """Every version of every car Node, as a watch delivers them (list, then watch; relist on 410)."""

    kube: KubeClient
    versions: dict[str, list[NodeVersion]] = field(default_factory=dict)
    relists: int = 0  # after the first list: a relist may skip versions, so tests that check every one assert 0

    async def run(self) -> None:
        path = resource_path("v1", "nodes")
        selector = f"{tk.LABEL_VEHICLE}=true"
        first = True
        while True:
            self.relists += not first
            first = False
            listed = await self.kube.list(path, labelSelector=selector)
            for node in listed["items"]:
                self._record(node)
            rv = listed["metadata"]["resourceVersion"]
            with contextlib.suppress(ApiError):
                while True:
                    async for event in self.kube.watch(path, rv, labelSelector=selector):
                        if event.type == "BOOKMARK":
                            rv = event.object["metadata"]["resourceVersion"]
                        elif event.type in ("ADDED", "MODIFIED"):
                            rv = event.object["metadata"]["resourceVersion"]
                            self._record(event.object)

    def _record(self, node: dict[str, Any]) -> None:
        meta, spec, status = node["metadata"], node.get("spec", {}), node.get("status", {})
        seen = self.versions.setdefault(meta["name"], [])
        if seen and seen[-1].rv == meta["resourceVersion"]:
            return
        ready = next((c["status"] for c in status.get("conditions", []) if c["type"] == "Ready"), None)
        seen.append(NodeVersion(
            at=time.monotonic(), rv=meta["resourceVersion"],
            taints=frozenset((t["key"], t.get("value"), t["effect"]) for t in spec.get("taints") or []),
            labels=dict(meta.get("labels") or {}), unschedulable=bool(spec.get("unschedulable")),
            annotations=dict(meta.get("annotations") or {}), ready=ready,
        ))

    def latest(self, name: str) -> NodeVersion | None:
        seen = self.versions.get(name)
        return seen[-1] if seen else None

    def since(self, name: str, at: float) -> list[NodeVersion]:
        return [v for v in self.versions.get(name, []) if v.at >= at]

    async def wait(self, what: str, name: str, ok: Any, timeout_s: float = 20.0) -> NodeVersion:
        """The latest version of ``name`` once ``ok`` holds for it (looked at every 50 ms, up to ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            v = self.latest(name)
            if v is not None and ok(v):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: {what} not within {timeout_s}s; last taints "
                                     f"{sorted(v.taints) if v else None}, labels {v.labels if v else None}")
            await asyncio.sleep(0.05)


# ---- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shim(crds_installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShimHandle]:
    yield from start_shim(crds_installed, tmp_path_factory.mktemp("shim-carstate"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nodes(crds_installed: Cluster) -> AsyncIterator[NodeLog]:
    async with KubeClient(KubeConfig.load(str(crds_installed.kubeconfig))) as kube:
        log = NodeLog(kube)
        task = asyncio.create_task(log.run(), name="node-log")
        yield log
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def car_bodies(names: tuple[str, ...], seed: int, **policy: Any) -> list[dict[str, Any]]:
    """VehicleNodes named ``names``: the owner's floor 50 %, any time, a high energy cap, plus ``policy``."""
    bodies = vehiclenodes(len(names), seed=seed, prefix="cs")
    for body, name in zip(bodies, names, strict=True):
        body["metadata"]["name"] = body["spec"]["vehicleId"] = name
        body["spec"]["policy"].update({"minStateOfCharge": 0.5, "criticalMargin": 0.05, "hardMinStateOfCharge": 0.2,
                                       "requirePluggedIn": True, "availability": [], "timezone": "UTC",
                                       "maxEnergyPerDayKWh": 50.0, "maxBatteryTemperatureC": 40.0,
                                       "hardMaxBatteryTemperatureC": 50.0, **policy})
    return bodies


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cars(crds_installed: Cluster, shim: ShimHandle, nodes: NodeLog, tmp_path_factory: pytest.TempPathFactory
               ) -> AsyncIterator[SimFleetHarness]:
    """The agent cars: parked, plugged in with the charger off (a state of charge set by a test stays put), 90 %."""
    bodies = car_bodies(AGENT_CARS, seed=31)
    for body in bodies:
        if body["metadata"]["name"] == "cs-battery":
            body["spec"]["policy"]["requirePluggedIn"] = False  # this owner lends the car on battery too
    apply_objects(crds_installed, bodies)
    specs = [VehicleNodeSpec.model_validate(b["spec"]) for b in bodies]
    config = AgentConfig(batch_size=1, checkpoint_every_seconds=1.0, status_interval_seconds=0.5,
                         log_interval_seconds=0.5)
    harness = SimFleetHarness(len(specs), shim.link_url, shim.fleet_ca.cert_pem,  # type: ignore[union-attr]
                              lambda name: shim.fleet_ca.issue(name, organizations=("fleetlet:cars",),  # type: ignore[union-attr]
                                                               client=True),
                              tmp_path_factory.mktemp("fleet"), seed=31, config=config, specs=specs)
    async with harness:
        for name in AGENT_CARS:
            i = harness.index(name)
            harness.fleet.set_state_of_charge(i, 0.9)
            harness.fleet.set_plugged_in(i, True, charger_w=0.0)
            harness.fleet.set_temperatures(i, battery_c=20.0, compute_c=35.0)
            harness.set_drive_state(name, "Parked")
        for name in AGENT_CARS:
            await nodes.wait("Ready", name, lambda v: v.ready == "True", 60)
        yield harness


@dataclass
class WindowCars:
    """Two cars whose owner lends them by the clock in Europe/Berlin (see ``windows``)."""

    closing: ScriptedCar  # its window is open now and closes at ``closes_at``
    closes_at: datetime  # UTC, a whole minute
    closes_at_mono: float  # the same instant on time.monotonic()
    open_before: bool  # the shim reported the window open before it closed
    utc_inside: ScriptedCar  # outside its window in Berlin, though the UTC wall clock is inside it

    async def closed(self) -> None:
        """Wait until the closing window's boundary is 3 s in the past (its taint write is done by then)."""
        await asyncio.sleep(max(0.0, self.closes_at_mono + 3.0 - time.monotonic()))


def berlin_windows(now: datetime) -> tuple[dict[str, str], dict[str, str], datetime] | None:
    """(closing window, window that is closed in Berlin but open by UTC wall time, instant the first closes).

    Windows are HH:MM wall times in the owner's zone, so the closing window ends at a minute boundary: the
    first one at least 20 s from now (so the shim has seen the window open before it closes), hence 20-80 s
    ahead. It started 3 hours ago: read as UTC instead of Berlin time (1 or 2 h behind), the same window
    would still be open for over an hour after it closes, so only a shim reading the owner's zone taints
    the car at the boundary. The second window is the current UTC wall time +- 10 min: read in Berlin it
    ended 50-110 min ago (and opens again tomorrow), read as UTC it is open now.

    Any time of day works: a window whose end is before its start runs past midnight (it belongs to the day
    it starts, and every day is listed), so near midnight the windows simply wrap; a DST change inside the
    last 3 hours moves the closing window's start, never its end, which is computed from the boundary
    instant. The one instant that cannot be written as HH:MM is a boundary inside the second pass of the
    hour Berlin repeats when summer time ends (an HH:MM there names the first pass): None then.
    """
    boundary = now.replace(second=0, microsecond=0) + timedelta(minutes=1)  # Berlin's offset is whole hours
    if (boundary - now).total_seconds() < 20:
        boundary += timedelta(minutes=1)
    end_local = boundary.astimezone(BERLIN)
    if end_local.fold == 1:  # the second pass of a repeated hour
        return None
    closing = {"start": (now - timedelta(hours=3)).astimezone(BERLIN).strftime("%H:%M"),
               "end": end_local.strftime("%H:%M")}
    utc_wall = now.astimezone(UTC)
    utc_inside = {"start": (utc_wall - timedelta(minutes=10)).strftime("%H:%M"),
                  "end": (utc_wall + timedelta(minutes=10)).strftime("%H:%M")}
    return closing, utc_inside, boundary


@pytest_asyncio.fixture(scope="module", loop_scope="module", autouse=True)
async def windows(crds_installed: Cluster, shim: ShimHandle, nodes: NodeLog) -> AsyncIterator[WindowCars | None]:
    """Set up before the first test on purpose: the closing window's boundary (20-80 s ahead) passes while the
    pod tests run, so the file does not sit idle waiting for it; ``test_...window_closes...`` checks it.
    None (that test skips) in the one hour a year no HH:MM can name the next minute (``berlin_windows``)."""
    now = datetime.now(UTC)
    chosen = berlin_windows(now)
    if chosen is None:
        yield None
        return
    closing_window, utc_window, closes_at = chosen
    closes_at_mono = time.monotonic() + (closes_at - datetime.now(UTC)).total_seconds()
    bodies = car_bodies(("cs-window-closing", "cs-window-utc"), seed=41, timezone="Europe/Berlin")
    bodies[0]["spec"]["policy"]["availability"] = [closing_window]
    bodies[1]["spec"]["policy"]["availability"] = [utc_window]
    apply_objects(crds_installed, bodies)
    made = [ScriptedCar(shim, b["metadata"]["name"], b["spec"]["hardware"]) for b in bodies]
    for car in made:
        await car.connect()
    # The car sends nothing more after its first telemetry: at the boundary only the shim's timer can act.
    first = await nodes.wait("registered", "cs-window-closing", lambda v: True, 15)
    open_before = not first.has(tk.OFF_HOURS) and time.monotonic() < closes_at_mono
    yield WindowCars(made[0], closes_at, closes_at_mono, open_before, made[1])
    for car in made:
        await car.close()


# ---- helpers ------------------------------------------------------------------------------------------------


async def kubectl(cluster: Cluster, *args: str, check: bool = True) -> str:
    """kubectl off the event loop (the cars, the links and the NodeLog keep running meanwhile)."""
    proc = await asyncio.to_thread(cluster.kubectl, *args, check=check)
    return proc.stdout


def shard_pod(name: str, car: str, model: str, shard: str, items: int,
              tolerations: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """A shard pod as the operator writes it, for the real scheduler, kept on ``car`` by a nodeSelector."""
    assignment = ShardAssignment.model_validate({"model": {"sha256": model},
                                                 "input": {"sha256": shard, "format": "npy", "end": items}})
    assignment.resources = ShardResources(cpu="1", memory="1Gi")
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"fleetlet.io/shard": name}},
        "spec": {
            "runtimeClassName": tk.RUNTIME_CLASS_ONNX,  # adds the vehicle toleration and the car node selector
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "nodeSelector": {"kubernetes.io/hostname": car},
            "tolerations": [  # the operator's: a car whose link dropped may come back and finish
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                 "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                 "tolerationSeconds": 300},
                *tolerations,
            ],
            "containers": [{"name": "shard", "image": f"fleetlet.io/onnx@sha256:{model}"}],
        },
    }
    return assignment.apply_to_pod(pod)


ON_BATTERY = {"key": tk.UNPLUGGED, "operator": "Equal", "value": tk.UNPLUGGED_ON_BATTERY, "effect": "NoSchedule"}


def _unschedulable(cluster: Cluster, name: str) -> str:
    """The scheduler's message on a pod it could not place ('' while it has not said so)."""
    pod = get_pod(cluster, name) or {}
    for c in pod.get("status", {}).get("conditions", []):
        if c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable":
            return str(c.get("message", ""))
    return ""


def _tolerates(toleration: dict[str, Any], taint: tuple[str, str | None, str]) -> bool:
    key, value, effect = taint
    if toleration.get("effect") and toleration["effect"] != effect:
        return False
    if toleration.get("operator") == "Exists":
        return not toleration.get("key") or toleration["key"] == key
    return bool(toleration.get("key") == key and toleration.get("value") == value)


async def pending_for_taint(cluster: Cluster, nodes: NodeLog, pod: str, car: str, key: str,
                            value: str | None = None) -> str:
    """Wait for the scheduler to leave ``pod`` unplaced for untolerated taints, and check that of all the taints on
    ``car`` (the only Node its selector allows) the pod fails to tolerate exactly one: ``key`` (=``value``).

    The v1.37 scheduler's message only counts "N node(s) had untolerated taint(s)" without naming them, so the
    taint is identified from the car's Node and the pod's tolerations (the RuntimeClass's included)."""
    seen: list[str] = [""]

    def probe() -> str | None:
        seen[0] = _unschedulable(cluster, pod)
        return seen[0] if "untolerated taint" in seen[0] else None

    try:
        message: str = await until(f"{pod} is left unschedulable for an untolerated taint", probe, 30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the scheduler said: {seen[0]!r}") from None
    tolerations = (get_pod(cluster, pod) or {})["spec"].get("tolerations") or []
    node = nodes.latest(car)
    assert node is not None
    untolerated = {t for t in node.taints if not any(_tolerates(x, t) for x in tolerations)}
    assert {(k, v) for k, v, _ in untolerated} == {(key, value)}, (untolerated, message)
    assert _node_name(cluster, pod) is None
    return message


def _node_name(cluster: Cluster, pod: str) -> str | None:
    return ((get_pod(cluster, pod) or {}).get("spec") or {}).get("nodeName")


async def delete_pods(cluster: Cluster, *names: str) -> None:
    await kubectl(cluster, "delete", "pod", *names, "-n", NS, "--ignore-not-found", "--wait=false")


def metric(shim: ShimHandle, name: str, **labels: str) -> float:
    """The sum of the shim's samples of ``name`` with these labels."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in shim.metrics().items()
               if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


# ---- the owner's plug rule ----------------------------------------------------------------------------------


async def test_a_pod_that_does_not_tolerate_unplugged_never_lands_on_an_unplugged_car_and_one_that_does_runs(
    crds_installed: Cluster, cars: SimFleetHarness, nodes: NodeLog, shards: dict[str, Any]
) -> None:
    for name in ("cs-battery", "cs-plugonly"):
        cars.fleet.set_plugged_in(cars.index(name), False)
    on_battery = await nodes.wait("unplugged=on-battery", "cs-battery",
                                  lambda v: v.has(tk.UNPLUGGED, tk.UNPLUGGED_ON_BATTERY, "NoSchedule"))
    assert on_battery.labels[tk.LABEL_PLUGGED_IN] == "false"
    await nodes.wait("unplugged=owner-requires-plug", "cs-plugonly",
                     lambda v: v.has(tk.UNPLUGGED, tk.UNPLUGGED_OWNER_REQUIRES_PLUG, "NoSchedule"))
    m, s, n = shards["model"], shards["short"], shards["short_items"]
    apply_objects(crds_installed, [
        shard_pod("strict-on-battery-car", "cs-battery", m, s, n),  # a job that needs a plugged-in car
        shard_pod("battery-ok", "cs-battery", m, s, n, tolerations=(ON_BATTERY,)),  # placement.allowUnplugged
        shard_pod("battery-ok-plug-only-owner", "cs-plugonly", m, s, n, tolerations=(ON_BATTERY,)),
    ])
    try:
        await until("the tolerant pod succeeds on the unplugged car",
                    lambda: pod_phase(crds_installed, "battery-ok") == "Succeeded", 90)
        done = get_pod(crds_installed, "battery-ok")
        assert done is not None and done["spec"]["nodeName"] == "cs-battery"
        term = done["status"]["containerStatuses"][0]["state"]["terminated"]
        assert json.loads(term["message"])["itemsDone"] == 300  # real inference ran on the car, on battery
        await pending_for_taint(crds_installed, nodes, "strict-on-battery-car", "cs-battery", tk.UNPLUGGED,
                                tk.UNPLUGGED_ON_BATTERY)
        # On-battery is the job's choice only where the owner allows it: this owner requires the plug.
        await pending_for_taint(crds_installed, nodes, "battery-ok-plug-only-owner", "cs-plugonly", tk.UNPLUGGED,
                                tk.UNPLUGGED_OWNER_REQUIRES_PLUG)
        for pod in ("strict-on-battery-car", "battery-ok-plug-only-owner"):
            assert _node_name(crds_installed, pod) is None, f"{pod} landed on an unplugged car"
    finally:
        await delete_pods(crds_installed, "strict-on-battery-car", "battery-ok", "battery-ok-plug-only-owner")
        for name in ("cs-battery", "cs-plugonly"):
            cars.fleet.set_plugged_in(cars.index(name), True)


# ---- the owner's floor and temperature limits, with hysteresis ----------------------------------------------


async def test_a_car_under_its_owners_floor_gets_no_new_pods_until_it_recovers_past_the_hysteresis_margin(
    crds_installed: Cluster, cars: SimFleetHarness, nodes: NodeLog, shards: dict[str, Any]
) -> None:
    i = cars.index("cs-floor")
    cars.fleet.set_state_of_charge(i, 0.47)  # under the 50 % floor, over the 45 % stop floor
    low = await nodes.wait("battery-low", "cs-floor", lambda v: v.has(tk.BATTERY_LOW, None, "NoSchedule"))
    assert not low.has(tk.BATTERY_CRITICAL) and low.labels[tk.LABEL_SOC_BAND] == "4"
    apply_objects(crds_installed, [shard_pod("floor", "cs-floor", shards["model"], shards["short"],
                                             shards["short_items"])])
    try:
        await pending_for_taint(crds_installed, nodes, "floor", "cs-floor", tk.BATTERY_LOW)
        # Back over the floor but inside the 2 % margin: the shim has seen it (the decile label moved to 5)
        # and still holds the taint, so the pod stays where it is.
        cars.fleet.set_state_of_charge(i, 0.515)
        held = await nodes.wait("the 51.5 % reading", "cs-floor", lambda v: v.labels[tk.LABEL_SOC_BAND] == "5")
        assert held.has(tk.BATTERY_LOW), "battery-low cleared inside its hysteresis margin"
        await asyncio.sleep(2.0)
        assert _node_name(crds_installed, "floor") is None, "the pod landed while the car was inside the margin"
        cars.fleet.set_state_of_charge(i, 0.53)  # past floor + 2 %: open again
        await nodes.wait("battery-low cleared", "cs-floor", lambda v: not v.has(tk.BATTERY_LOW))
        await until("the pod lands and runs", lambda: pod_phase(crds_installed, "floor") == "Succeeded", 90)
        assert _node_name(crds_installed, "floor") == "cs-floor"
    finally:
        await delete_pods(crds_installed, "floor")
        cars.fleet.set_state_of_charge(i, 0.9)


async def test_a_car_over_its_soft_temperature_limit_gets_no_new_pods_until_it_cools_past_the_margin(
    crds_installed: Cluster, cars: SimFleetHarness, nodes: NodeLog, shards: dict[str, Any]
) -> None:
    i = cars.index("cs-thermal")
    cars.fleet.set_temperatures(i, battery_c=43.0)  # soft limit 40 °C, hard 50 °C
    hot = await nodes.wait("thermal", "cs-thermal", lambda v: v.has(tk.THERMAL, None, "NoSchedule"))
    assert not hot.has(tk.OVERHEAT)
    apply_objects(crds_installed, [shard_pod("thermal", "cs-thermal", shards["model"], shards["short"],
                                             shards["short_items"])])
    try:
        await pending_for_taint(crds_installed, nodes, "thermal", "cs-thermal", tk.THERMAL)
        cars.fleet.set_temperatures(i, battery_c=39.0)  # under the limit, not 2 °C under: still no new work
        await asyncio.sleep(3.0)
        assert nodes.latest("cs-thermal").has(tk.THERMAL)  # type: ignore[union-attr]
        assert _node_name(crds_installed, "thermal") is None, "the pod landed inside the temperature margin"
        cars.fleet.set_temperatures(i, battery_c=37.0)
        await nodes.wait("thermal cleared", "cs-thermal", lambda v: not v.has(tk.THERMAL))
        await until("the pod lands and runs", lambda: pod_phase(crds_installed, "thermal") == "Succeeded", 90)
        assert _node_name(crds_installed, "thermal") == "cs-thermal"
    finally:
        await delete_pods(crds_installed, "thermal")
        cars.fleet.set_temperatures(i, battery_c=20.0)


# ---- driving: the reflex first, then the taint, the real taint-eviction controller, the shim -------------------


def _events(cluster: Cluster, name: str, kind: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "events", "-A", "-o", "json",
                          "--field-selector", f"involvedObject.name={name},involvedObject.kind={kind}").stdout
    return list(json.loads(out)["items"])


async def test_a_car_that_starts_driving_is_tainted_noexecute_and_its_pod_evicted_after_the_reflex_killed_it(
    crds_installed: Cluster, cars: SimFleetHarness, nodes: NodeLog, shards: dict[str, Any]
) -> None:
    car = "cs-driver"
    apply_objects(crds_installed, [shard_pod("driven", car, shards["model"], shards["long"], shards["long_items"])])
    await until("the long shard runs on the car", lambda: pod_phase(crds_installed, "driven") == "Running"
                and cars.agents[car].running == 1, 60)
    uid = get_pod(crds_installed, "driven")["metadata"]["uid"]  # type: ignore[index]
    agent = cars.agents[car]
    pid = agent.run_pid(uid)
    assert pid is not None
    changed = time.monotonic()
    cars.set_drive_state(car, "Driving")  # the reflex runs inside this call, before any API server hears of it
    trip = agent.reflex.last_trip
    assert dead_or_dying(pid), "the sandbox still runs after the car left Parked"
    assert trip is not None and trip.latency_ns < 100_000_000, "the reflex target is 100 ms"
    try:
        tainted = await nodes.wait("driving:NoExecute", car, lambda v: v.has(tk.DRIVING, None, "NoExecute"))
        taint_s = tainted.at - changed
        await until("the pod is evicted and gone", lambda: get_pod(crds_installed, "driven") is None, 60)
        gone_s = time.monotonic() - changed
        evictions = [e for e in _events(crds_installed, "driven", "Pod") if e["reason"] == "TaintManagerEviction"]
        assert evictions, "the pod was not deleted by the taint-eviction controller"
        assert "Marking for deletion" in evictions[0]["message"], evictions[0]["message"]
        await until("the car holds nothing of the pod", lambda: agent.assignment(uid) is None, 20)
        assert agent.running == 0
        print(f"\ndriving: reflex {trip.latency_ns / 1e6:.2f} ms; taint on the Node after {taint_s:.2f} s; "
              f"pod gone after {gone_s:.2f} s")
        assert taint_s < 2.0, f"the driving taint took {taint_s:.2f} s (target 2 s)"
    finally:
        cars.set_drive_state(car, "Parked")
        cars.fleet.set_plugged_in(cars.index(car), True, charger_w=0.0)  # driving unplugs the car
        await nodes.wait("driving cleared", car, lambda v: not v.has(tk.DRIVING))
        await delete_pods(crds_installed, "driven")


async def test_a_pod_evicted_from_a_driving_car_is_stopped_on_the_car_by_the_shim(
    crds_installed: Cluster, shim: ShimHandle, nodes: NodeLog
) -> None:
    """A car that has no reflex of its own (a scripted car that keeps saying Running): the eviction of its pod
    by the taint-eviction controller reaches the car as a stop from the shim."""
    body = car_bodies(("cs-evictee",), seed=43)[0]
    apply_objects(crds_installed, [body])
    car = ScriptedCar(shim, "cs-evictee", body["spec"]["hardware"])
    await car.connect()
    try:
        await nodes.wait("Ready", car.name, lambda v: v.ready == "True", 30)
        apply_objects(crds_installed, [shard_pod("evictee", car.name, "c" * 64, "c" * 64, 10)])
        uid = (await car.wait_for_assign("evictee")).uid
        await car.report(uid, "Running", items_done=1)
        await until("Running", lambda: pod_phase(crds_installed, "evictee") == "Running", 30)
        await car.telemetry(driveState="Driving", pluggedIn=False)
        await nodes.wait("driving:NoExecute", car.name, lambda v: v.has(tk.DRIVING, None, "NoExecute"))
        stop = await car.wait_for("stop", uid, timeout_s=30)
        assert stop.reason == "PodDeleted"
        assert any(e["reason"] == "TaintManagerEviction" for e in _events(crds_installed, "evictee", "Pod"))
        await car.report(uid, "Failed", reason="Stopped")
        await until("the pod is gone", lambda: get_pod(crds_installed, "evictee") is None, 30)
    finally:
        await car.close()
        await delete_pods(crds_installed, "evictee")


# ---- the owner's hours, in the owner's time zone --------------------------------------------------------------


async def test_a_car_whose_window_closes_in_berlin_is_tainted_off_hours_at_the_boundary_while_utc_says_open(
    crds_installed: Cluster, windows: WindowCars | None, nodes: NodeLog
) -> None:
    if windows is None:
        pytest.skip("Berlin is in the repeated hour of the end of summer time: no HH:MM names the next minute")
    assert windows.open_before, "the shim did not report the closing window open before it closed"
    await windows.closed()
    closing = windows.closing.name
    await nodes.wait("off-hours", closing, lambda v: v.has(tk.OFF_HOURS, None, "NoSchedule"), 5)
    first = next(v for v in nodes.versions[closing] if v.has(tk.OFF_HOURS))
    assert first.at >= windows.closes_at_mono, "off-hours was set before the window closed"
    assert first.at - windows.closes_at_mono < 3.0, "off-hours came long after the window closed"
    # The shim stamps the transition when it evaluated: at the boundary, not before it, not long after.
    events = [e for e in _events(crds_installed, closing, "Node") if e["reason"] == "OutsideAvailabilityWindow"]
    assert len(events) == 1, events
    stamped = datetime.fromisoformat(events[0]["firstTimestamp"].replace("Z", "+00:00"))
    assert windows.closes_at <= stamped <= windows.closes_at + timedelta(seconds=2), (stamped, windows.closes_at)
    assert "Europe/Berlin" in events[0]["message"]
    # Read as UTC wall time this window would be open for another hour or more.
    vn = json.loads(await kubectl(crds_installed, "get", "vn", closing, "-o", "json"))
    within = next(c for c in vn["status"]["conditions"] if c["type"] == "WithinSchedule")
    assert (within["status"], within["reason"]) == ("False", "OutsideAvailabilityWindow"), within
    # The other car: inside its window by the UTC wall clock, outside it in Berlin, tainted from the start.
    other = windows.utc_inside.name
    assert all(v.has(tk.OFF_HOURS, None, "NoSchedule") for v in nodes.versions[other]), "open by UTC wall time"


# ---- a car hovering at its floor ------------------------------------------------------------------------------


def hover_readings(amplitude: float, *, seed: int, floor: float = 0.5, step_s: float = 15.0,
                   period_s: float = 600.0, noise: float = 0.003) -> list[float]:
    """An hour of state-of-charge readings every ``step_s``: a sine of ``amplitude`` around the floor
    (``period_s``: six swings an hour) plus uniform noise of +- ``noise``."""
    rng = random.Random(seed)
    return [round(floor + amplitude * math.sin(2 * math.pi * t / period_s) + rng.uniform(-noise, noise), 4)
            for t in np.arange(step_s, 3600.0 + step_s / 2, step_s)]


def node_writes_by_policy(policy: Policy, start: float, readings: list[float]) -> int:
    """How many Node writes the pure policy asks for over ``readings`` (taints or labels change)."""
    now = datetime.now(UTC)

    def reading(soc: float) -> Telemetry:
        return Telemetry.model_validate({**PARKED, "stateOfCharge": soc, "observedAt": now})

    prev: CarPolicy = evaluate(policy, reading(start), now=now)
    writes = 0
    for soc in readings:
        cur = evaluate(policy, reading(soc), now=now, previous=prev)
        writes += (cur.taints, dict(cur.labels)) != (prev.taints, dict(prev.labels))
        prev = cur
    return writes


async def _hover(cluster: Cluster, shim: ShimHandle, nodes: NodeLog, name: str, readings: list[float]
                 ) -> tuple[int, int, int]:
    """Connect ``name`` at 50.5 %, feed it ``readings`` one by one; returns (taint writes counted by the shim,
    Node versions with changed taints/labels seen by the watch, carstate evaluations)."""
    body = car_bodies((name,), seed=47)[0]
    apply_objects(cluster, [body])
    car = ScriptedCar(shim, name, body["spec"]["hardware"])
    await car.connect(telemetry={"stateOfCharge": 0.505})
    try:
        start = await nodes.wait("registered at 50.5 %", name, lambda v: v.labels.get(tk.LABEL_SOC_BAND) == "5", 20)
        assert not start.has(tk.BATTERY_LOW)
        await asyncio.sleep(1.0)  # let registration's own writes settle before counting
        writes0 = metric(shim, "fleetlet_shim_taint_writes_total")
        syncs0 = metric(shim, "fleetlet_shim_controller_syncs_total", controller="carstate")
        seen0 = len(nodes.versions[name])
        for soc in readings:  # a simulated hour, one reading per 15 s, sent 40 ms apart
            await car.telemetry(stateOfCharge=soc)
            await asyncio.sleep(0.04)
        await asyncio.sleep(1.0)
        writes = int(metric(shim, "fleetlet_shim_taint_writes_total") - writes0)
        syncs = int(metric(shim, "fleetlet_shim_controller_syncs_total", controller="carstate") - syncs0)
        versions = nodes.versions[name][seen0 - 1:]
        changed = sum(1 for a, b in zip(versions, versions[1:], strict=False)
                      if (a.taints, a.labels) != (b.taints, b.labels))
        assert nodes.latest(name).has(tk.BATTERY_LOW)  # type: ignore[union-attr]
        return writes, changed, syncs
    finally:
        await car.close()


async def test_a_car_hovering_at_its_floor_for_a_simulated_hour_makes_a_bounded_small_number_of_taint_writes(
    crds_installed: Cluster, shim: ShimHandle, nodes: NodeLog, windows: WindowCars | None
) -> None:
    """Two hours of readings around the 50 % floor, measured with the shim's fleetlet_shim_taint_writes_total
    (every Node write of taints, labels or cordon) while no other car changes:

    - jitter (+-0.6 % swing + +-0.3 % noise, every reading inside both margins): exactly 1 write, the
      battery-low taint at the first reading under the floor; it is never cleared (that needs 52 %) and the
      state-of-charge label never moves (that needs 49 % or 51 %);
    - swing (+-1.5 % + noise, 48.2-51.7 %): the taint is still written once, but the decile label follows the
      swings (to "4" at each of the 6 troughs under 49 %, back to "5" at each of the 5 crests over 51 % after
      the first trough): 12 writes in the hour. The label's margin is 1 %, the taint's 2 %: a swing wider
      than the label's margin costs two label writes.
    """
    if windows is not None:
        await windows.closed()  # the window car's boundary write must not land inside the count
    policy = Policy.model_validate(car_bodies(("x",), seed=47)[0]["spec"]["policy"])
    jitter, swing = hover_readings(0.006, seed=1), hover_readings(0.015, seed=2)
    assert 0.49 < min(jitter) and max(jitter) < 0.51 and max(swing) < 0.52
    assert node_writes_by_policy(policy, 0.505, jitter) == 1
    assert node_writes_by_policy(policy, 0.505, swing) == 12

    writes, changed, syncs = await _hover(crds_installed, shim, nodes, "cs-hover-jitter", jitter)
    print(f"\nhover jitter: {len(jitter)} readings, {syncs} evaluations, {writes} taint writes "
          f"({changed} Node versions changed taints/labels)")
    assert syncs >= len(jitter), "readings were coalesced: the count would understate the writes"
    assert writes == changed == 1

    writes, changed, syncs = await _hover(crds_installed, shim, nodes, "cs-hover-swing", swing)
    print(f"hover swing: {len(swing)} readings, {syncs} evaluations, {writes} taint writes "
          f"({changed} Node versions changed taints/labels)")
    assert syncs >= len(swing)
    assert 1 <= writes <= 12 and writes == changed


# ---- cordon ---------------------------------------------------------------------------------------------------


async def _patch_vn(cluster: Cluster, name: str, patch: dict[str, Any], status: bool = False) -> None:
    args = ["patch", "vn", name, "--type=merge", "-p", json.dumps(patch)]
    await kubectl(cluster, *args, *(["--subresource=status"] if status else []))


async def test_a_paused_car_is_cordoned_and_uncordoned_by_the_shim_but_a_kubectl_cordon_is_never_lifted(
    crds_installed: Cluster, shim: ShimHandle, nodes: NodeLog
) -> None:
    body = car_bodies(("cs-pause",), seed=53)[0]
    apply_objects(crds_installed, [body])
    car = ScriptedCar(shim, "cs-pause", body["spec"]["hardware"])
    await car.connect()
    name = car.name
    try:
        await nodes.wait("Ready", name, lambda v: v.ready == "True", 30)
        await _patch_vn(crds_installed, name, {"spec": {"paused": True}})
        paused = await nodes.wait("cordoned", name, lambda v: v.unschedulable)
        assert paused.annotations.get("fleetlet.io/cordoned-by") == "owner-paused"
        await _patch_vn(crds_installed, name, {"spec": {"paused": False}})
        free = await nodes.wait("uncordoned", name, lambda v: not v.unschedulable)
        assert "fleetlet.io/cordoned-by" not in free.annotations

        await kubectl(crds_installed, "cordon", name)  # an admin's cordon: not ours to lift
        mark = time.monotonic()
        await nodes.wait("cordoned by kubectl", name, lambda v: v.unschedulable)
        await _patch_vn(crds_installed, name, {"spec": {"paused": True}})
        await asyncio.sleep(1.0)
        await _patch_vn(crds_installed, name, {"spec": {"paused": False}})
        await car.telemetry(pluggedIn=False)  # and more Fleetlet writes on top
        await nodes.wait("unplugged", name, lambda v: v.has(tk.UNPLUGGED))
        await car.telemetry(pluggedIn=True)
        await nodes.wait("plugged", name, lambda v: not v.has(tk.UNPLUGGED))
        await asyncio.sleep(1.0)
        after = nodes.since(name, mark)
        assert after and all(v.unschedulable for v in after), "the shim lifted a cordon it did not set"
        assert all("fleetlet.io/cordoned-by" not in v.annotations for v in after)
        assert "SchedulingDisabled" in await kubectl(crds_installed, "get", "node", name)
    finally:
        await kubectl(crds_installed, "uncordon", name, check=False)
        await car.close()


# ---- foreign taints ---------------------------------------------------------------------------------------------


async def test_a_users_taint_and_the_controller_managers_not_ready_taint_survive_every_fleetlet_taint_write(
    crds_installed: Cluster, shim: ShimHandle, nodes: NodeLog
) -> None:
    body = car_bodies(("cs-keeper",), seed=59, requirePluggedIn=False)[0]
    apply_objects(crds_installed, [body])
    car = ScriptedCar(shim, "cs-keeper", body["spec"]["hardware"])
    await car.connect()
    name = car.name
    key, value, effect = USER_TAINT
    try:
        await nodes.wait("Ready", name, lambda v: v.ready == "True", 30)
        await kubectl(crds_installed, "taint", "node", name, f"{key}={value}:{effect}")
        user_from = (await nodes.wait("the user's taint", name, lambda v: v.has(key, value, effect))).at
        writes0, relists0 = metric(shim, "fleetlet_shim_taint_writes_total"), nodes.relists

        # Fleetlet writes while the car is connected (each replaces the whole taint list).
        for fields, ok in (
            ({"pluggedIn": False}, lambda v: v.has(tk.UNPLUGGED, tk.UNPLUGGED_ON_BATTERY)),
            ({"pluggedIn": False, "stateOfCharge": 0.47}, lambda v: v.has(tk.BATTERY_LOW)),
            ({"pluggedIn": False, "stateOfCharge": 0.47, "batteryTemperatureC": 43.0}, lambda v: v.has(tk.THERMAL)),
            ({}, lambda v: not v.keys() & {tk.UNPLUGGED, tk.BATTERY_LOW, tk.THERMAL}),
        ):
            await car.telemetry(**fields)
            await nodes.wait(f"after {fields}", name, ok)

        # The link drops: the shim reports NotReady and the node lifecycle controller adds its own taints.
        await car.disconnect()
        not_ready = await nodes.wait("not-ready taints", name, lambda v: v.has("node.kubernetes.io/not-ready",
                                                                              None, "NoExecute")
                                     and v.has("node.kubernetes.io/not-ready", None, "NoSchedule"), 30)
        cm_from = not_ready.at

        # Fleetlet writes while the car is away: the owner's rules and the operator's trust change.
        for change, ok in (
            ({"spec": {"policy": {"minStateOfCharge": 0.95}}}, lambda v: v.has(tk.BATTERY_LOW)),
            ({"status": {"trust": {"untrusted": True}}}, lambda v: v.has(tk.UNTRUSTED)),
            ({"spec": {"policy": {"minStateOfCharge": 0.5}}}, lambda v: not v.has(tk.BATTERY_LOW)),
            ({"status": {"trust": {"untrusted": False}}}, lambda v: not v.has(tk.UNTRUSTED)),
        ):
            await _patch_vn(crds_installed, name, change, status="status" in change)
            await nodes.wait(f"after {change}", name, ok)
        away = nodes.since(name, cm_from)
        await car.connect()
        back = await nodes.wait("not-ready lifted by the controller-manager", name,
                                lambda v: not v.has("node.kubernetes.io/not-ready"), 30)
        writes = metric(shim, "fleetlet_shim_taint_writes_total") - writes0
        assert writes >= 8, f"only {writes} Fleetlet taint writes were made"

        every = nodes.since(name, user_from)
        assert nodes.relists == relists0, "the watch relisted: some Node versions may be missing from the check"
        assert all(v.has(key, value, effect) for v in every), "a Fleetlet write dropped the user's taint"
        assert all(v.has("node.kubernetes.io/not-ready", None, "NoExecute")
                   and v.has("node.kubernetes.io/not-ready", None, "NoSchedule") for v in away), \
            "a Fleetlet write dropped the controller-manager's not-ready taint"
        assert sum(v.has(tk.UNTRUSTED) for v in away) and sum(v.has(tk.BATTERY_LOW) for v in away)
        assert back.has(key, value, effect) and back.has(tk.VEHICLE, "true", "NoSchedule")
        print(f"\nforeign taints: {writes:.0f} Fleetlet taint writes, {len(every)} Node versions checked, "
              f"{metric(shim, 'fleetlet_shim_taint_conflicts_total'):.0f} conflicts redone so far")
    finally:
        await kubectl(crds_installed, "taint", "node", name, f"{key}-", check=False)
        await car.close()


# ---- what a person sees -----------------------------------------------------------------------------------------


async def test_kubectl_shows_connected_schedulable_the_reason_taints_and_aggregated_events_of_a_flapping_car(
    crds_installed: Cluster, shim: ShimHandle, nodes: NodeLog, cars: SimFleetHarness
) -> None:
    body = car_bodies(("cs-flapper",), seed=61)[0]  # the owner lends it only while plugged in
    apply_objects(crds_installed, [body])
    car = ScriptedCar(shim, "cs-flapper", body["spec"]["hardware"])
    await car.connect()
    name, flaps = car.name, 9
    try:
        await nodes.wait("Ready", name, lambda v: v.ready == "True", 30)
        await asyncio.sleep(1.0)  # registration's own writes settle
        writes0 = metric(shim, "fleetlet_shim_taint_writes_total")
        conflicts0 = metric(shim, "fleetlet_shim_taint_conflicts_total")
        for k in range(flaps):  # the plug flaps: out, in, out, ... ending unplugged
            await car.telemetry(pluggedIn=False)
            await nodes.wait(f"unplugged #{k + 1}", name, lambda v: v.has(tk.UNPLUGGED))
            if k < flaps - 1:
                await car.telemetry(pluggedIn=True)
                await nodes.wait(f"plugged #{k + 1}", name, lambda v: not v.has(tk.UNPLUGGED))

        # One Node write per change, and none redone: the shim's next look at the car (set off by its own
        # VehicleNode status write) uses the Node its write returned, not a cache that has not caught up yet.
        await asyncio.sleep(1.0)
        assert metric(shim, "fleetlet_shim_taint_writes_total") - writes0 == 2 * flaps - 1
        assert metric(shim, "fleetlet_shim_taint_conflicts_total") - conflicts0 == 0

        def shim_events() -> dict[str, dict[str, Any]]:
            return {e["reason"]: e for e in _events(crds_installed, name, "Node")
                    if e.get("source", {}).get("component") == "fleetlet-shim"}

        counts: dict[str, int] = {}

        def counted() -> bool:
            counts.clear()
            counts.update({reason: e.get("count", 1) for reason, e in shim_events().items()})
            # ReadyForWork: once per re-plug, and once more if the shim looked at the car before its first
            # telemetry arrived (NoTelemetry, then ReadyForWork).
            return counts.get("Unplugged") == flaps and counts.get("ReadyForWork") in (flaps - 1, flaps)

        try:
            await until("the events are aggregated and counted", counted, 30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {counts}") from None
        events = shim_events()
        assert set(events) == {"Unplugged", "ReadyForWork"}, sorted(events)  # 17+ changes, 2 Events
        assert events["Unplugged"]["type"] == "Warning"

        described = await kubectl(crds_installed, "describe", "node", name)
        taints = described.split("Taints:", 1)[1].split("Unschedulable:", 1)[0]
        assert f"{tk.UNPLUGGED}={tk.UNPLUGGED_OWNER_REQUIRES_PLUG}:NoSchedule" in taints, described
        assert f"{tk.VEHICLE}=true:NoSchedule" in taints
        assert re.search(rf"Warning\s+Unplugged\s+.*\(x{flaps} over", described), described
        assert re.search(rf"Normal\s+ReadyForWork\s+.*\(x{counts['ReadyForWork']} over", described), described

        def rows(wide: bool) -> dict[str, dict[str, str]]:
            """kubectl's table, read by the header's column positions (an empty cell stays empty)."""
            out = crds_installed.kubectl("get", "vn", name, "cs-battery", "cs-floor",
                                         *(["-o", "wide"] if wide else [])).stdout.splitlines()
            starts = [m.start() for m in re.finditer(r"\S+", out[0])]
            cols = [out[0][a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
            table = [{c: line[a:b].strip() for c, a, b in zip(cols, starts, [*starts[1:], None], strict=True)}
                     for line in out[1:]]
            return {r["NAME"]: r for r in table}

        cars.fleet.set_plugged_in(cars.index("cs-battery"), False)
        cars.fleet.set_state_of_charge(cars.index("cs-floor"), 0.47)
        expected = {name: ("True", "False", "Unplugged"), "cs-battery": ("True", "True", "OnBattery"),
                    "cs-floor": ("True", "False", "ChargeBelowFloor")}
        await until("kubectl get vn -o wide shows each car's state",
                    lambda: {n: (r.get("CONNECTED"), r.get("SCHEDULABLE"), r.get("REASON"))
                             for n, r in rows(True).items()} == expected, 30)
        plain = rows(False)
        assert "REASON" not in plain[name] and plain[name]["CONNECTED"] == "True"  # the reason is -o wide only
        assert plain[name]["SCHEDULABLE"] == "False"
    finally:
        cars.fleet.set_plugged_in(cars.index("cs-battery"), True)
        cars.fleet.set_state_of_charge(cars.index("cs-floor"), 0.9)
        await car.close()
