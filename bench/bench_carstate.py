"""Car state -> scheduling at fleet scale (PERFORMANCE.md target 4, and target 3 with the owner's policy running).

SIMULATED cars at the protocol level (the real car-side ``CarLink``: TLS WebSocket, own certificate, hello,
telemetry with its deadband and refresh; no agent behind it, as in bench_shim.py), one fleetlet-shim process,
and the real kube-apiserver, etcd, kube-scheduler and kube-controller-manager (default node-monitor grace 50 s),
all on this machine. Each car's owner policy is the seeded fleet's (floors, plug rules, zones, energy caps), with
any-time availability so every car starts schedulable. ``--changing`` of the cars run one shard pod each (bound
to the car; the car answers Running, as an agent does).

1. Idle soak (``--soak`` s, default 300: every periodic write of a car, the Lease every 25 s, the Node status
   every 300 s and the telemetry refresh every 300 s, falls inside it once): API writes per idle car per minute,
   as the shim counts its own and as the API server counts every mutating request (by anyone) on nodes, leases,
   vehiclenodes, events and pods. Cars report a reading every 30 s (state of charge drifting inside the link's
   deadband), as a parked car does. Target <= 3.
2. Burst: ``--changing`` cars change drive state Parked -> Driving, spread evenly over one second. At its change
   a car sends its Driving telemetry and reports its pod Failed (CarLeftParked), as an agent does right after its
   reflex. A separate process watches Nodes and pods and stamps (CLOCK_MONOTONIC, shared by all processes) when
   each Node first carries ``fleetlet.io/driving:NoExecute``, when each pod reads Failed and when it is gone
   (the real taint-eviction controller deletes it; the shim finishes the deletion). Reported: change -> taint
   p50/p99/max (target p99 <= 2 s), change -> pod Failed, change -> pod gone, and API writes per state change.
3. Agent side (the sandbox dead on the car): the protocol-level cars run no sandbox, so ``--reflex-cars`` of the
   changing cars also get bench_reflex.py's set-up: a real ``SafetyReflex`` on a simulated vehicle and a stand-in
   sandbox (a child in its own process group), flipped to Driving on a vehicle-bus thread at the car's change
   instant, during the burst, in this same busy process (every car's link on its event loop); change -> SIGKILL
   queued (the child runs no instruction of its own after it) and change -> child reaped (waitpid). Unlike
   bench_reflex.py the child mostly sleeps: 50 busy loops would starve the control plane this run measures, and
   niced busy loops get starved themselves, so their reaping would time the kernel's scheduler. Target p99 < 100 ms.

Writes bench/results/carstate.json (machine, versions, method, figures; an analysis of where the time goes).

    python bench/bench_carstate.py                              # 5,000 cars, 500 changing (several minutes)
    python bench/bench_carstate.py --cars 500 --changing 50 --soak 60   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import follow, histogram_quantile, machine, proc_cpu_seconds, proc_rss_mib, prom_labels
from fleetlet_car.link import CarLink, CarLinkConfig, Command, car_ssl_context
from fleetlet_car.reflex import SafetyReflex
from fleetlet_car.sim import SimulatedFleet, SimulatedVehicle, make_vehicle_specs

from fleetlet import __version__
from fleetlet.api.v1alpha1 import Telemetry
from fleetlet.api.v1alpha1 import taints as tk
from fleetlet.api.v1alpha1.shard import ShardAssignment, ShardResources
from fleetlet.carlink.protocol import Ack, Assign, Capacity, ContainerState, PodStatus, Stop
from fleetlet.cli.local import ShimHandle, apply_objects, start_shim, vehiclenodes
from fleetlet.kube import KubeClient, KubeConfig, resource_path
from fleetlet.localcluster import LocalCluster

RESULTS = Path(__file__).resolve().parent / "results" / "carstate.json"
CRDS = Path(__file__).resolve().parent.parent / "crds"
NS = "default"
POD_LABEL = "fleetlet.io/bench-carstate"
DIGEST = "c" * 64
# The stand-in sandbox: normal priority, and mostly asleep (50 busy loops would starve the control plane whose
# latency this benchmark measures; a niced busy loop is starved instead, and its reaping measures the scheduler).
LIGHT_CHILD = "import sys, time; sys.stdout.write('r'); sys.stdout.flush()\nwhile True: time.sleep(0.001)"
MUTATING = ("POST", "PUT", "PATCH", "DELETE", "APPLY")


def watcher_main(kubeconfig: str, conn: Any, stop: Any) -> None:
    """Watch car Nodes and bench pods; stamp first sightings with time.monotonic (CLOCK_MONOTONIC, system-wide)."""
    asyncio.run(_watch(kubeconfig, conn, stop))


async def _watch(kubeconfig: str, conn: Any, stop: Any) -> None:
    driving: dict[str, float] = {}
    failed: dict[str, float] = {}
    gone: dict[str, float] = {}
    evicted: dict[str, float] = {}

    def node(obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if name not in driving and any(t.get("key") == tk.DRIVING and t.get("effect") == "NoExecute"
                                       for t in obj.get("spec", {}).get("taints") or []):
            driving[name] = time.monotonic()

    def pod(kind: str, obj: dict[str, Any]) -> None:
        car = obj.get("spec", {}).get("nodeName", "")
        now = time.monotonic()
        if kind == "DELETED":
            gone.setdefault(car, now)
            return
        if obj.get("status", {}).get("phase") == "Failed":
            failed.setdefault(car, now)
        if obj["metadata"].get("deletionTimestamp"):
            evicted.setdefault(car, now)

    async with KubeClient(KubeConfig.load(kubeconfig)) as kube:
        synced_nodes, synced_pods = asyncio.Event(), asyncio.Event()
        tasks = [
            asyncio.create_task(follow(kube, resource_path("v1", "nodes"), {"labelSelector": f"{tk.LABEL_VEHICLE}=true"},
                                       lambda kind, obj: node(obj), synced_nodes)),
            asyncio.create_task(follow(kube, resource_path("v1", "pods", NS), {"labelSelector": f"{POD_LABEL}=true"},
                                       pod, synced_pods)),
        ]
        await synced_nodes.wait()
        await synced_pods.wait()
        conn.send("synced")
        await asyncio.to_thread(stop.wait)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    conn.send({"driving": driving, "failed": failed, "gone": gone, "deleting": evicted})


# ---- protocol-level cars -------------------------------------------------------------------------------------


class BenchCar:
    """One car's link and its one pod: it answers an assign with Running, a stop with Failed, an ack by forgetting."""

    def __init__(self, name: str, link_url: str, ctx: Any, hw: dict[str, Any]) -> None:
        self.name = name
        self.uid: str | None = None
        self.link = CarLink(link_url, name, ctx, agent_version="bench-carstate/1", runtimes=["onnx"],
                            capacity=Capacity(cpu=hw["cpu"], memory=hw["memory"]), on_message=self.on_message,
                            config=CarLinkConfig(heartbeat_seconds=40.0, dead_after_seconds=60.0))
        self.soc = 0.95  # well inside a state-of-charge decile: the drift below moves no label

    def telemetry(self, drive: str = "Parked") -> Telemetry:
        return Telemetry(state_of_charge=round(self.soc, 5), plugged_in=drive == "Parked", drive_state=drive,  # type: ignore[arg-type]
                         battery_temperature_c=20.0, compute_temperature_c=35.0, observed_at=datetime.now(UTC))

    def status(self, phase: str, reason: str | None = None) -> PodStatus:
        now = datetime.now(UTC)
        running = phase == "Running"
        assert self.uid is not None
        return PodStatus(car=self.name, uid=self.uid, phase=phase, items_done=1,  # type: ignore[arg-type]
                         container=ContainerState(state="running" if running else "terminated",
                                                  exit_code=None if running else 1, reason=reason,  # type: ignore[arg-type]
                                                  started_at=now, finished_at=None if running else now))

    async def on_message(self, cmd: Command) -> None:
        if isinstance(cmd, Assign):
            self.uid = cmd.uid
            await self.link.send(self.status("Running"))
        elif isinstance(cmd, Stop) and cmd.uid == self.uid:
            await self.link.send(self.status("Failed", "Stopped"))
        elif isinstance(cmd, Ack) and cmd.uid == self.uid:
            self.uid = None


def shard_pod(car: str) -> dict[str, Any]:
    """A shard pod as the operator writes it, bound straight to ``car`` (placement is target 5's benchmark)."""
    assignment = ShardAssignment.model_validate({"model": {"sha256": DIGEST}, "input": {"sha256": DIGEST, "end": 10}})
    assignment.resources = ShardResources(cpu="1", memory="256Mi")
    return assignment.apply_to_pod({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"shard-{car}", "namespace": NS, "labels": {POD_LABEL: "true"}},
        "spec": {"nodeName": car, "runtimeClassName": tk.RUNTIME_CLASS_ONNX, "restartPolicy": "Never",
                 "terminationGracePeriodSeconds": 30, "automountServiceAccountToken": False,
                 "enableServiceLinks": False,
                 "tolerations": [
                     {"key": tk.VEHICLE, "operator": "Exists", "effect": "NoSchedule"},
                     {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                      "tolerationSeconds": 300},
                     {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                      "tolerationSeconds": 300}],
                 "containers": [{"name": "shard", "image": f"fleetlet.io/onnx@sha256:{DIGEST}"}]},
    })


# ---- the agent-side reflex on a subset (bench_reflex.py's method) ---------------------------------------------


class ReflexRig:
    """``n`` simulated vehicles, each with a real SafetyReflex and a stand-in sandbox child; a vehicle-bus thread
    flips them to Driving when told and records change -> child reaped."""

    def __init__(self, n: int, seed: int) -> None:
        self.fleet = SimulatedFleet(make_vehicle_specs(n, seed), seed=seed, schedules=False)
        self.reflexes: list[SafetyReflex] = []
        self.children: list[subprocess.Popen[bytes]] = []
        self.dead_ns: list[int] = []
        self.sent_ns: list[int] = []
        self.callbacks_ns: list[int] = []
        self._marks: list[dict[str, int]] = []
        self._bus: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run_bus, name="vehicle-bus", daemon=True)
        for i in range(n):
            self.fleet.set_plugged_in(i, True, charger_w=7400.0)
            self.fleet.set_state_of_charge(i, 0.9)
            reflex = SafetyReflex(self.fleet.specs[i].policy)
            reflex.attach(SimulatedVehicle(self.fleet.car(i)))
            self.reflexes.append(reflex)

    def arm(self) -> None:
        """Start the stand-in sandboxes and the bus thread."""
        for reflex in self.reflexes:
            child = subprocess.Popen([sys.executable, "-c", LIGHT_CHILD], stdout=subprocess.PIPE,
                                     start_new_session=True)
            assert child.stdout is not None
            child.stdout.read(1)
            self.children.append(child)
            marks: dict[str, int] = {}

            def kill(pid: int = child.pid, marks: dict[str, int] = marks) -> None:
                if "sent" in marks:
                    return
                os.killpg(pid, signal.SIGKILL)
                marks["sent"] = time.perf_counter_ns()
                os.waitpid(pid, 0)
                marks["dead"] = time.perf_counter_ns()

            reflex.add_stop_callback(kill)
            assert reflex.admit().allowed
            self._marks.append(marks)
        self._thread.start()

    def flip(self, i: int) -> None:
        self._bus.put(i)

    def _run_bus(self) -> None:
        while (i := self._bus.get()) is not None:
            self.fleet.set_drive_state(i, "Driving")
            trip = self.reflexes[i].last_trip
            marks = self._marks[i]
            if trip is not None and "dead" in marks:
                self.dead_ns.append(marks["dead"] - trip.changed_at_ns)
                self.sent_ns.append(marks["sent"] - trip.changed_at_ns)
                self.callbacks_ns.append(trip.latency_ns)

    def close(self) -> None:
        self._bus.put(None)
        self._thread.join(timeout=10)
        for child in self.children:
            if child.poll() is None and child.returncode is None:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait(timeout=5)
                except (ProcessLookupError, ChildProcessError):
                    pass
            child.returncode = child.returncode if child.returncode is not None else -9
            if child.stdout:
                child.stdout.close()


# ---- measuring ----------------------------------------------------------------------------------------------


def apiserver_metrics(cluster: LocalCluster) -> str:
    ctx = cluster._ssl_context(client=True)
    return urllib.request.urlopen(f"{cluster.server}/metrics", context=ctx, timeout=30).read().decode()


def apiserver_writes(text: str) -> Counter[str]:
    """Mutating requests by "verb resource[/subresource]", as the API server counts them (every client)."""
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            lab = prom_labels(line)
            if lab.get("verb") in MUTATING:
                res = lab.get("resource", "") + ("/" + lab["subresource"] if lab.get("subresource") else "")
                out[f"{lab['verb']} {res}"] += float(line.rsplit(" ", 1)[1])
    return out


def apiserver_latency(text0: str, text1: str, verb: str, resource: str, q: float) -> float | None:
    """Upper bucket bound holding quantile ``q`` of apiserver_request_duration_seconds between two scrapes."""
    def buckets(text: str) -> dict[float, float]:
        out: dict[float, float] = {}
        for line in text.splitlines():
            if line.startswith("apiserver_request_duration_seconds_bucket{"):
                lab = prom_labels(line)
                if lab.get("verb") == verb and lab.get("resource") == resource and not lab.get("subresource"):
                    le = float("inf") if lab["le"] == "+Inf" else float(lab["le"])
                    out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
        return out
    b0, b1 = buckets(text0), buckets(text1)
    rows = sorted((le, b1[le] - b0.get(le, 0.0)) for le in b1)
    if not rows or rows[-1][1] <= 0:
        return None
    return next(le for le, n in rows if n >= q * rows[-1][1])


def flow_control(text0: str, text1: str) -> dict[str, dict[str, Any]]:
    """API Priority and Fairness between two scrapes, per priority level that dispatched requests: how many,
    how long they queued in the API server before running (p50/p99 bucket bounds), how many were rejected."""
    def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
        return [(prom_labels(line), float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                if line.startswith(name + "{")]

    def totals(text: str, name: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for lab, v in samples(text, name):
            out[lab.get("priority_level", "")] += v
        return out

    dispatched = totals(text1, "apiserver_flowcontrol_dispatched_requests_total") - \
        totals(text0, "apiserver_flowcontrol_dispatched_requests_total")
    rejected = totals(text1, "apiserver_flowcontrol_rejected_requests_total") - \
        totals(text0, "apiserver_flowcontrol_rejected_requests_total")
    out: dict[str, dict[str, Any]] = {}
    for level, n in dispatched.items():
        def buckets(text: str, level: str = level) -> dict[float, float]:
            b: dict[float, float] = {}
            for lab, v in samples(text, "apiserver_flowcontrol_request_wait_duration_seconds_bucket"):
                if lab.get("priority_level") == level and lab.get("execute") == "true":
                    le = float("inf") if lab["le"] == "+Inf" else float(lab["le"])
                    b[le] = b.get(le, 0.0) + v
            return b
        b0, b1 = buckets(text0), buckets(text1)
        rows = sorted((le, b1[le] - b0.get(le, 0.0)) for le in b1)
        total = rows[-1][1] if rows else 0.0

        def q(x: float, rows: list[tuple[float, float]] = rows, total: float = total) -> float | None:
            return next((le for le, c in rows if c >= x * total), None) if total > 0 else None

        out[level] = {"dispatched": int(n), "rejected": int(rejected.get(level, 0)),
                      "queue_wait_p50_s": q(0.5), "queue_wait_p99_s": q(0.99)}
    return out


def shim_writes(m0: dict[str, float], m1: dict[str, float]) -> Counter[str]:
    out: Counter[str] = Counter()
    for key, value in m1.items():
        if key.startswith("fleetlet_shim_api_calls_total{"):
            lab = prom_labels(key)
            if lab["verb"] in MUTATING:
                delta = value - m0.get(key, 0.0)
                if delta:
                    out[f"{lab['verb']} {lab['resource']}"] += delta
    return out


def quantiles(values_s: list[float]) -> dict[str, Any]:
    if not values_s:
        return {"n": 0}
    a = np.asarray(values_s)
    return {"n": int(a.size), "p50_s": round(float(np.percentile(a, 50)), 3),
            "p90_s": round(float(np.percentile(a, 90)), 3), "p99_s": round(float(np.percentile(a, 99)), 3),
            "max_s": round(float(a.max()), 3)}


def quantiles_ms(values_ns: list[int]) -> dict[str, Any]:
    if not values_ns:
        return {"n": 0}
    a = np.asarray(values_ns, dtype=np.float64) / 1e6
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "max_ms": round(float(a.max()), 3)}


class Cpu:
    """CPU seconds of every process of the run, sampled between two points."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def sample(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            try:
                out[name] = proc_cpu_seconds(pid)
            except (FileNotFoundError, ProcessLookupError):
                out[name] = 0.0
        return out

    @staticmethod
    def cores(a: dict[str, float], b: dict[str, float], seconds: float) -> dict[str, float]:
        return {k: round((b[k] - a[k]) / seconds, 3) for k in a}


def shim_metrics(shim: ShimHandle) -> dict[str, float]:
    """A loaded shim answers late, not never: a longer timeout than ``ShimHandle.metrics``'s default."""
    return shim.metrics(timeout_s=30.0)


async def scrape(shim: ShimHandle, cluster: LocalCluster, cpu: Cpu
                 ) -> tuple[dict[str, float], str, dict[str, float], float]:
    """The shim's metrics, the API server's, every process's CPU seconds, and when (off the cars' event loop)."""
    m, a = await asyncio.gather(asyncio.to_thread(shim_metrics, shim), asyncio.to_thread(apiserver_metrics, cluster))
    return m, a, cpu.sample(), time.monotonic()


def other_apiservers(ours: int) -> int:
    """kube-apiserver processes on this machine besides ours: another control plane competing for the cores."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != ours:
            try:
                if (entry / "comm").read_text().strip() == "kube-apiserver":
                    count += 1
            except OSError:
                continue
    return count


# ---- the run ----------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fleetlet-bench-carstate-"))
    cluster = LocalCluster(state_dir=work / "cp")  # the production node-monitor grace period (50 s)
    cluster.start()
    cluster.kubectl("apply", "--server-side", "-k", str(CRDS))
    cluster.kubectl("wait", "--for=condition=Established", "crd/vehiclenodes.fleetlet.io")
    gen = start_shim(cluster, work / "shim", lease_renew_s=args.renew, local=cluster, heartbeat_s=30.0,
                     dead_after_s=45.0)
    shim: ShimHandle = next(gen)
    pids = {c.name: c.process.pid for c in cluster.components if c.process is not None}
    pids["fleetlet-shim"] = shim.process.pid
    pids["bench (cars)"] = os.getpid()
    cars: list[BenchCar] = []
    watcher: multiprocessing.process.BaseProcess | None = None
    rig: ReflexRig | None = None
    result: dict[str, Any] = {}
    try:
        # --- cars -------------------------------------------------------------------------------------------
        bodies = vehiclenodes(args.cars, seed=args.seed, prefix="cs")
        for body in bodies:
            body["spec"]["policy"]["availability"] = []  # every car schedulable when the burst starts
        for i in range(0, len(bodies), 500):
            apply_objects(cluster, bodies[i:i + 500])
        print(f"[{args.cars} cars] {len(bodies)} VehicleNodes applied; connecting", file=sys.stderr, flush=True)
        for body in bodies:
            name = body["metadata"]["name"]
            crt, key = shim.car_cert(name)
            car = BenchCar(name, shim.link_url, car_ssl_context(shim.fleet_ca_file, crt, key), body["spec"]["hardware"])
            car.link.report_telemetry(car.telemetry())  # sent right after the welcome
            cars.append(car)
        t0 = time.monotonic()
        for i, car in enumerate(cars):
            car.link.start()
            if i % 50 == 49:
                await asyncio.sleep(50 / args.connect_rate)
        while (await asyncio.to_thread(shim_metrics, shim)).get("fleetlet_shim_nodes_ready", 0) < args.cars:
            if time.monotonic() - t0 > args.register_timeout:
                raise RuntimeError(f"not every car Ready within {args.register_timeout:.0f} s")
            await asyncio.sleep(1.0)
        registration_s = time.monotonic() - t0
        print(f"[{args.cars} cars] all Ready in {registration_s:.1f} s", file=sys.stderr, flush=True)

        # --- one shard pod on each car that will change ---------------------------------------------------
        changing = rng.sample(cars, args.changing)
        pods = [shard_pod(c.name) for c in changing]
        for i in range(0, len(pods), 250):  # off the loop: a blocked loop misses the shim's pings, links drop
            await asyncio.to_thread(apply_objects, cluster, pods[i:i + 250])
        t1 = time.monotonic()
        while sum(1 for c in changing if c.uid) < len(changing) or \
                (await asyncio.to_thread(shim_metrics, shim)).get('fleetlet_shim_pods{phase="Running"}', 0) < len(changing):
            if time.monotonic() - t1 > 120:
                raise RuntimeError("the shard pods did not all run within 120 s")
            await asyncio.sleep(1.0)
        print(f"[{args.changing} pods] Running on their cars", file=sys.stderr, flush=True)

        # --- idle soak -----------------------------------------------------------------------------------------
        drift = asyncio.create_task(_drift(cars))
        # A fleet coming online is not idle: every first renewal creates a Lease, and the controller-manager
        # patches every new Node (its TTL annotation, rewritten for every Node each time the cluster grows into
        # another size bucket, beta labels, its initial taints) under its client rate limit (20 QPS): minutes
        # of Node writes after 5,000 cars join. Soak only once a 15 s window has none of those.
        settle_t0 = time.monotonic()
        api_before, shim_before = apiserver_writes(await asyncio.to_thread(apiserver_metrics, cluster)), \
            await asyncio.to_thread(shim_metrics, shim)
        settled = False
        while time.monotonic() - settle_t0 < args.settle_timeout:
            await asyncio.sleep(15.0)
            api_now, shim_now = apiserver_writes(await asyncio.to_thread(apiserver_metrics, cluster)), \
                await asyncio.to_thread(shim_metrics, shim)
            others = (api_now - api_before)["PATCH nodes"] - shim_writes(shim_before, shim_now)["PATCH nodes"]
            creating = (api_now - api_before)["POST leases"]
            api_before, shim_before = api_now, shim_now
            print(f"settling: {others:.0f} Node patches by others, {creating:.0f} Leases created in 15 s",
                  file=sys.stderr, flush=True)
            if others <= 0 and not creating:
                settled = True
                break
        settle_s = time.monotonic() - settle_t0
        print(f"settled after {settle_s:.0f} s", file=sys.stderr, flush=True)
        cpu = Cpu(pids)
        others_seen = {"soak": other_apiservers(pids["kube-apiserver"])}
        m0, a0, c0, s0 = await scrape(shim, cluster, cpu)
        print(f"idle soak {args.soak:.0f} s", file=sys.stderr, flush=True)
        await asyncio.sleep(args.soak)
        m1, a1, c1, s1 = await scrape(shim, cluster, cpu)
        soak_s = s1 - s0
        drift.cancel()
        idle_shim = shim_writes(m0, m1)
        idle_api = apiserver_writes(a1) - apiserver_writes(a0)
        per_min = 60.0 / soak_s / args.cars
        fleet_resources = ("nodes", "leases", "vehiclenodes", "events", "pods")
        idle_api_fleet = {k: v for k, v in idle_api.items() if k.split(" ", 1)[1].split("/")[0] in fleet_resources}
        idle = {
            "settled_after_seconds": round(settle_s, 1),
            "settled": settled,
            "soak_seconds": round(soak_s, 1),
            "shim_writes_per_car_per_minute": round(sum(idle_shim.values()) * per_min, 3),
            "apiserver_writes_per_car_per_minute": round(sum(idle_api_fleet.values()) * per_min, 3),
            "shim_writes_by_call": {k: int(v) for k, v in sorted(idle_shim.items())},
            "apiserver_writes_by_call": {k: int(v) for k, v in sorted(idle_api_fleet.items())},
            "taint_writes": int(m1.get("fleetlet_shim_taint_writes_total", 0)
                                - m0.get("fleetlet_shim_taint_writes_total", 0)),
            "cpu_cores": Cpu.cores(c0, c1, soak_s),
            "lease_renewal_lag_p50_s": histogram_quantile(m1, "fleetlet_shim_lease_renewal_lag_seconds", 0.5, since=m0),
            "lease_renewal_lag_p99_s": histogram_quantile(m1, "fleetlet_shim_lease_renewal_lag_seconds", 0.99,
                                                          since=m0),
            "target_writes_per_car_per_minute": 3.0,
        }
        idle["meets_target"] = idle["apiserver_writes_per_car_per_minute"] <= 3.0
        print(json.dumps(idle), file=sys.stderr, flush=True)

        # --- burst ---------------------------------------------------------------------------------------------
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        stop = ctx.Event()
        watcher = ctx.Process(target=watcher_main, args=(str(cluster.kubeconfig), child, stop), daemon=True)
        watcher.start()
        if not await asyncio.to_thread(parent.poll, 180) or parent.recv() != "synced":
            raise RuntimeError("the watcher did not sync")
        rig = ReflexRig(min(args.reflex_cars, args.changing), args.seed)
        await asyncio.to_thread(rig.arm)
        await asyncio.sleep(3.0)  # the watcher's list and the stand-in sandboxes' start-up are over
        others_seen["burst"] = other_apiservers(pids["kube-apiserver"])
        profiler = None
        if args.profile_shim:  # where the shim's own time goes during the burst (py-spy, when asked for)
            profiler = await asyncio.create_subprocess_exec(
                "py-spy", "record", "-p", str(shim.process.pid), "-d", "20", "-r", "50", "-f", "raw",
                "-o", str(args.profile_shim), "--nonblocking",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        m0, a0, c0, _ = await scrape(shim, cluster, cpu)
        changed_at: dict[str, float] = {}
        start = time.monotonic() + 0.2
        for k, car in enumerate(changing):
            due = start + k / len(changing)
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            changed_at[car.name] = time.monotonic()
            if k < len(rig.reflexes):
                rig.flip(k)
            car.link.report_telemetry(car.telemetry("Driving"))
            if car.uid is not None:
                await car.link.send(car.status("Failed", "CarLeftParked"))
        spread_s = time.monotonic() - start
        print(f"[burst] {len(changing)} cars changed within {spread_s:.2f} s", file=sys.stderr, flush=True)
        # Until every Node is tainted and every pod gone (or a minute), then the trailing writes settle.
        queue_peak: dict[str, float] = {}
        cpu_trace = [(start, c0)]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            cpu_trace.append((time.monotonic(), cpu.sample()))
            m = await asyncio.to_thread(shim_metrics, shim)
            for key, v in m.items():
                if key.startswith("fleetlet_shim_controller_queue_ready{"):
                    queue_peak[prom_labels(key)["controller"]] = max(queue_peak.get(prom_labels(key)["controller"], 0), v)
            if m.get('fleetlet_shim_pods{phase="Failed"}', 0) + m.get('fleetlet_shim_pods{phase="Running"}', 0) == 0 \
                    and time.monotonic() - start > 5:
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(5.0)
        burst_s = time.monotonic() - start
        m1, a1, c1, _ = await scrape(shim, cluster, cpu)
        stop.set()
        seen = parent.recv() if await asyncio.to_thread(parent.poll, 60) else {}
        await asyncio.to_thread(watcher.join, 10)
        rig.close()

        if profiler is not None:
            await profiler.wait()

        def latencies(kind: str) -> list[float]:
            return [seen[kind][c] - changed_at[c] for c in changed_at if c in seen.get(kind, {})]

        # CPU from the first change until the last Node carried its taint: the busy part of the burst.
        last_taint = max(seen.get("driving", {}).values(), default=start)
        at, until_taint = min(cpu_trace[1:] or cpu_trace, key=lambda tc: abs(tc[0] - last_taint))

        taint = latencies("driving")
        burst_shim = shim_writes(m0, m1)
        burst_api = apiserver_writes(a1) - apiserver_writes(a0)
        # Periodic writes (Leases, Node status, telemetry refresh) go on during the burst: take the idle rate out.
        idle_rate = {k: v / soak_s for k, v in idle_api_fleet.items()}
        n = len(changing)

        def per_change(counts: Counter[str]) -> dict[str, float]:
            """Writes in the window per change, by call. Lease renewals and Node status reports are periodic
            (no change causes them) and are left out; everything else is counted whole (a telemetry refresh
            that happened to fall in the window would show as VehicleNode status writes: see periodic_*)."""
            out = {}
            for k, v in sorted(counts.items()):
                resource = k.split(" ", 1)[1]
                if resource.split("/")[0] in fleet_resources and resource not in ("leases", "nodes/status"):
                    out[k] = round(v / n, 3)
            return out

        periodic = {k: int(v) for k, v in sorted(burst_api.items()) if k.split(" ", 1)[1] in ("leases", "nodes/status")}
        per_change_api = per_change(burst_api)
        per_change_shim = per_change(burst_shim)
        burst = {
            "cars_changing": n,
            "changes_spread_seconds": round(spread_s, 3),
            "window_seconds": round(burst_s, 1),
            "change_to_driving_taint_on_node": {**quantiles(taint), "missing": n - len(taint),
                                                "target_p99_s": 2.0},
            "change_to_pod_failed_in_api": quantiles(latencies("failed")),
            "change_to_pod_deletion_started": quantiles(latencies("deleting")),
            "change_to_pod_gone": quantiles(latencies("gone")),
            "taint_writes": int(m1.get("fleetlet_shim_taint_writes_total", 0)
                                - m0.get("fleetlet_shim_taint_writes_total", 0)),
            "taint_write_conflicts": int(m1.get("fleetlet_shim_taint_conflicts_total", 0)
                                         - m0.get("fleetlet_shim_taint_conflicts_total", 0)),
            "shim_writes_per_change": {"total": round(sum(per_change_shim.values()), 2), **per_change_shim},
            "apiserver_writes_per_change": {"total": round(sum(per_change_api.values()), 2), **per_change_api},
            "periodic_writes_in_window_not_counted": periodic,
            "idle_rate_of_those_per_window": {k: round(v * burst_s) for k, v in idle_rate.items()
                                              if k.split(" ", 1)[1] in ("leases", "nodes/status")},
            "cpu_cores": Cpu.cores(c0, c1, burst_s),
            "cpu_cores_until_the_last_taint": Cpu.cores(c0, until_taint, max(at - start, 0.1)),
            "where_the_time_goes": {
                "shim_carstate_sync_p50_s": histogram_quantile(m1, "fleetlet_shim_controller_sync_seconds", 0.5,
                                                               'controller="carstate"', since=m0),
                "shim_carstate_sync_p99_s": histogram_quantile(m1, "fleetlet_shim_controller_sync_seconds", 0.99,
                                                               'controller="carstate"', since=m0),
                "shim_patch_call_p99_s": histogram_quantile(m1, "fleetlet_shim_api_call_seconds", 0.99,
                                                            'verb="PATCH"', since=m0),
                "apiserver_node_patch_p50_s": apiserver_latency(a0, a1, "PATCH", "nodes", 0.5),
                "apiserver_node_patch_p99_s": apiserver_latency(a0, a1, "PATCH", "nodes", 0.99),
                "shim_queue_ready_peak": queue_peak,
                "apiserver_flow_control": flow_control(a0, a1),
            },
        }
        taint_ok = bool(taint) and not burst["change_to_driving_taint_on_node"]["missing"] and \
            burst["change_to_driving_taint_on_node"]["p99_s"] <= 2.0
        burst["meets_target"] = taint_ok
        burst["analysis"] = analysis(burst, idle, n)
        print(json.dumps(burst), file=sys.stderr, flush=True)
        reflex = {
            "cars": len(rig.reflexes),
            "method": "bench_reflex.py's: a real SafetyReflex attached to a simulated vehicle, a stand-in sandbox "
                      "(a child in its own process group, mostly asleep so that 50 of them leave the control "
                      "plane its CPU), the flip made on a vehicle-bus thread at the car's change instant during "
                      "the burst, in the process that runs every car's link; change -> SIGKILL queued (the "
                      "child runs no instruction of its own after it) -> child reaped (waitpid)",
            "change_to_sandbox_dead": quantiles_ms(rig.dead_ns),
            "change_to_sigkill_sent": quantiles_ms(rig.sent_ns),
            "change_to_callbacks_returned": quantiles_ms(rig.callbacks_ns),
            "target_p99_ms": 100.0,
        }
        reflex["meets_target"] = bool(rig.dead_ns) and reflex["change_to_sandbox_dead"]["p99_ms"] < 100.0
        result = {
            "registration_seconds": round(registration_s, 1),
            "idle": idle,
            "burst": burst,
            "agent_side_reflex": reflex,
            "shim_rss_mib": round(proc_rss_mib(shim.process.pid), 1),
            "other_control_planes_running": others_seen,
        }
    finally:
        if watcher is not None and watcher.is_alive():
            watcher.kill()
        if rig is not None:
            rig.close()
        await asyncio.gather(*(c.link.close() for c in cars), return_exceptions=True)
        gen.close()
        cluster.stop()
    return result


def analysis(burst: dict[str, Any], idle: dict[str, Any], n: int) -> list[str]:
    """Where the time goes, in words, from the figures just measured."""
    taint, failed, gone = (burst["change_to_driving_taint_on_node"], burst["change_to_pod_failed_in_api"],
                           burst["change_to_pod_gone"])
    why = burst["where_the_time_goes"]
    out = [
        f"change -> driving taint: p50 {taint.get('p50_s')} s, p99 {taint.get('p99_s')} s for {n} changes in "
        f"{burst['changes_spread_seconds']} s (target p99 2 s). The path: the car's telemetry over its link, "
        f"the shim's carstate sync (p50 <= {why['shim_carstate_sync_p50_s']} s, p99 <= "
        f"{why['shim_carstate_sync_p99_s']} s, histogram bucket bounds), one Node PATCH (the API server's p50 "
        f"<= {why['apiserver_node_patch_p50_s']} s, p99 <= {why['apiserver_node_patch_p99_s']} s), the watch "
        f"event to the watcher. {burst['taint_write_conflicts']} of {burst['taint_writes']} taint writes were "
        "redone after a 409 (someone else wrote the Node between the read and the write).",
        f"change -> pod reported Failed in the API: p99 {failed.get('p99_s')} s (the car's report, one pod "
        "status PATCH by the shim, concurrent with the taint write).",
        f"change -> pod gone: p99 {gone.get('p99_s')} s. This is the real taint-eviction controller's pace, not "
        "Fleetlet's: each eviction costs the kube-controller-manager two requests (the DisruptionTarget "
        "condition, the DELETE) under its client rate limit (--kube-api-qps 20, burst 30, the defaults this "
        "control plane runs with), so the last of N evictions lands about (2N - 30) / 20 s after the burst.",
        "API writes per change, shim: the taint PATCH (plus redone conflicts), the VehicleNode status PATCH "
        "(urgent: drive state changed), one Event (Schedulable turned False: Driving), the pod status PATCH, "
        "and the DELETE that finishes the pod's deletion (a 404 when the API server already removed the "
        "terminal pod). The API server's count adds the controller-manager's eviction writes and its Event.",
        f"idle: {idle['apiserver_writes_per_car_per_minute']} writes per car per minute counted by the API "
        f"server over {idle['soak_seconds']} s: Lease renewals (every 25 s: 2.4/min) and, once per 300 s, a Node "
        "status report and a telemetry refresh; the policy itself writes nothing while nothing changes "
        f"({idle['taint_writes']} taint writes in the soak).",
    ]
    return out


async def _drift(cars: list[BenchCar]) -> None:
    """A parked car's readings: every 30 s, its state of charge 0.02 % lower (inside the link's deadband: the link
    sends it with its 300 s refresh), spread over the interval."""
    while True:
        for i, car in enumerate(cars):
            car.soc -= 0.0002
            car.link.report_telemetry(car.telemetry())
            if i % 100 == 99:
                await asyncio.sleep(30.0 * 100 / len(cars))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cars", type=int, default=5000)
    p.add_argument("--changing", type=int, default=500, help="cars that change to Driving within one second")
    p.add_argument("--reflex-cars", type=int, default=50, help="changing cars that also run the agent-side reflex")
    p.add_argument("--soak", type=float, default=300.0, help="idle seconds measured before the burst")
    p.add_argument("--renew", type=float, default=25.0, help="the shim's Lease renewal interval (its default)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--register-timeout", type=float, default=300.0)
    p.add_argument("--settle-timeout", type=float, default=900.0,
                   help="longest wait for the start-up writes (Lease creation, the controller-manager's) to end")
    p.add_argument("--connect-rate", type=float, default=250.0, help="new car links per second")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--profile-shim", type=Path, help="record the shim with py-spy (on PATH) during the burst")
    args = p.parse_args()
    if args.changing > args.cars:
        p.error("--changing must not exceed --cars")
    started = time.time()
    load_at_start = os.getloadavg()
    figures = asyncio.run(run(args))
    binaries = next((p.name for p in (Path.home() / ".cache" / "fleetlet").glob("k8s-*")), "")
    out = {
        "benchmark": "car state -> scheduling: drive-state burst and idle writes with the owner's policy running",
        "machine": {**machine(), "note": "apiserver, etcd, scheduler, controller-manager, shim, every car and "
                                         "the watcher on this machine"},
        "versions": {"fleetlet": __version__, "control_plane": binaries or "v1.37.2",
                     "python": platform.python_version()},
        "parameters": {"cars": args.cars, "changing": args.changing, "reflex_cars": args.reflex_cars,
                       "soak_seconds": args.soak, "lease_renew_seconds": args.renew, "seed": args.seed,
                       "node_monitor_grace_period_seconds": 50},
        "method": __doc__,
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": os.getloadavg(),
        **figures,
        "wall_seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
