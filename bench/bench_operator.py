"""FleetJobs at fleet scale (PERFORMANCE.md targets 5, 6 and 7, operator side): a 10,000-shard FleetJob on 5,000
cars whose compute is SIMULATED.

What is real: the kube-apiserver, etcd, kube-scheduler and kube-controller-manager; fleetlet-operator and
fleetlet-shim as their own processes under their own RBAC; every car's agent (``CarAgent``: TLS link with its
own certificate, safety reflex, owner's rules, energy meter, outbox), pods, bindings, taints and Leases. What is
SIMULATED: the vehicles (``SimulatedFleet`` physics, parked, plugged in, 90 % charged) and the cars' compute
(``SimulatedCompute``: a shard takes ``shard_size / items_per_second`` seconds, checkpoints and yields a
deterministic result; no model runs). Cars run in ``--fleet-procs`` child processes (``SimFleetHarness`` each),
all on this machine, beside the control plane.

Phases, in one run on one fleet:
0. operator memory: the operator alone with 0, ``--vn-small`` and ``--cars`` VehicleNodes (RSS after its caches
   synced and every VehicleNode got its finalizer) -> MiB per extra 1,000 VehicleNodes (target <= 25).
   Then every car's trust record is seeded (``status.trust.validStreak`` = ``--trust-streak``): an established fleet.
1. placement + departures (job ``place``): ``--shards`` shards, parallelism = shards (all created at once),
   replicas 1, ``spotCheckRate`` ``--spot-check``. Measured: job creation -> every shard's pod bound by the real
   kube-scheduler (shards placed per second, target >= 333), pod first seen -> first Running p50/p99 (a
   separate watcher process stamps CLOCK_MONOTONIC; target p99 <= 5 s), where the time goes (operator create
   rate, scheduler bind lag, shim dispatch, per-process CPU), the operator's RSS at 5,000 cars + 10,000 shards
   (target <= 250 MiB). Cars drive off mid-shard (``--interrupt`` of the shards, SIMULATED departures: the
   car's drive state flips to Driving at a random point of its shard, its reflex kills the work, it parks again
   ``--away`` s later); measured from the cars' side (each run's items computed, recorded by the car's runner):
   the share of car compute that ended in accepted results (target >= 90 %) and the redone work (target <= 5 %).
2. verification (job ``verify``): the same fleet, no departures, ``--liars`` cars returning wrong results:
   verification overhead at steady state = compute of audit/tiebreaker replicas over primary compute (target
   <= 10 %), and the share of the liars' wrong results caught (not accepted; target >= 99 %).
3. optional (``--rerun-scheduler-qps Q``): the kube-scheduler restarted with ``--kube-api-qps Q`` and phase 1's
   placement measured again (no departures), to separate the scheduler's client-side rate limit from the rest.

Compute is counted in items (SIMULATED compute runs at a constant rate, so items = car compute seconds x rate).

Writes bench/results/operator.json (machine, versions, flags, method, figures, targets met or missed).

    python bench/bench_operator.py                 # 5,000 cars, 10,000 shards (about 30 minutes)
    python bench/bench_operator.py --quick         # 500 cars, 1,000 shards (a few minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import follow, machine, prom_labels

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "operator.json"
CRDS = HERE.parent / "crds"
NS = "default"
LABEL_JOB_UID = "fleetlet.io/job-uid"
MUTATING = ("POST", "PUT", "PATCH", "DELETE", "APPLY")


# ---- small measuring tools (bench_soak.py uses them too) ----------------------------------------------------------


def proc_stat(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of a process from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return cpu, rss


class Sampler:
    """CPU seconds and RSS of named processes, sampled every ``interval`` s on the caller's event loop."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.pids: dict[str, int] = {}
        self.samples: list[tuple[float, dict[str, tuple[float, float]]]] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def sample(self) -> None:
        row: dict[str, tuple[float, float]] = {}
        with contextlib.suppress(OSError, ValueError):  # the whole machine (every process, ours or not)
            f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
            row["_machine"] = ((sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK"), 0.0)
        for name, pid in list(self.pids.items()):
            with contextlib.suppress(OSError, IndexError, ValueError):
                row[name] = proc_stat(pid)
        self.samples.append((time.monotonic(), row))

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _at(self, t: float) -> dict[str, tuple[float, float]]:
        best = min(self.samples, key=lambda s: abs(s[0] - t))
        return best[1]

    def cores(self, t0: float, t1: float) -> dict[str, float]:
        """Cores each process used between t0 and t1 (nearest samples)."""
        a, b = self._at(t0), self._at(t1)
        seconds = max(1e-6, t1 - t0)
        return {k: round((b[k][0] - a[k][0]) / seconds, 3) for k in b if k in a}

    def rss(self, name: str, t: float) -> float | None:
        row = self._at(t)
        return round(row[name][1], 1) if name in row else None

    def rss_max(self, name: str, t0: float = 0.0, t1: float = float("inf")) -> float | None:
        values = [row[name][1] for t, row in self.samples if t0 <= t <= t1 and name in row]
        return round(max(values), 1) if values else None

    def timeline(self, t0: float, step: float = 60.0) -> list[dict[str, Any]]:
        """One row per ``step`` s: cores per process over the step and RSS at its end."""
        rows: list[dict[str, Any]] = []
        if not self.samples:
            return rows
        edge = t0
        prev = self._at(t0)
        prev_t = t0
        for t, row in self.samples:
            if t < edge + step:
                continue
            seconds = t - prev_t
            rows.append({"t_s": round(t - t0, 1),
                         "cores": {k: round((row[k][0] - prev[k][0]) / seconds, 3) for k in row if k in prev},
                         "rss_mib": {k: round(v[1], 1) for k, v in row.items() if not k.startswith("_")}})
            prev, prev_t, edge = row, t, t
        return rows


def parse_prom(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def prom_sum(m: dict[str, float], name: str, **want: str) -> float:
    total = 0.0
    for key, value in m.items():
        if key == name or key.startswith(name + "{"):
            lab = prom_labels(key)
            if all(lab.get(k) == v for k, v in want.items()):
                total += value
    return total


def prom_quantile(m1: dict[str, float], name: str, q: float, m0: dict[str, float] | None = None,
                  **want: str) -> float | None:
    """Upper bucket bound holding quantile ``q`` of histogram ``name`` (optionally between two scrapes), the
    buckets of every series matching ``want`` summed."""
    buckets: dict[float, float] = defaultdict(float)
    for key, value in m1.items():
        if key.startswith(name + "_bucket{"):
            lab = prom_labels(key)
            if all(lab.get(k) == v for k, v in want.items()):
                le = float("inf") if lab["le"] == "+Inf" else float(lab["le"])
                buckets[le] += value - (m0 or {}).get(key, 0.0)
    rows = sorted(buckets.items())
    if not rows or rows[-1][1] <= 0:
        return None
    return next(le for le, n in rows if n >= q * rows[-1][1])


def quantiles(values: Iterable[float], scale: float = 1.0, digits: int = 3) -> dict[str, Any]:
    a = np.asarray(list(values), dtype=np.float64) * scale
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "p50": round(float(np.percentile(a, 50)), digits),
            "p90": round(float(np.percentile(a, 90)), digits), "p99": round(float(np.percentile(a, 99)), digits),
            "max": round(float(a.max()), digits)}


def scrape(url: str, ctx: Any = None) -> dict[str, float]:
    return parse_prom(urllib.request.urlopen(url, context=ctx, timeout=30).read().decode())


def apiserver_metrics(cluster: Any) -> dict[str, float]:
    return scrape(f"{cluster.server}/metrics", cluster._ssl_context(client=True))


def scheduler_metrics(cluster: Any) -> dict[str, float]:
    return scrape(f"https://127.0.0.1:{cluster.ports['scheduler']}/metrics", cluster._ssl_context(client=False))


def apiserver_writes(m0: dict[str, float], m1: dict[str, float]) -> dict[str, float]:
    """Mutating requests between two scrapes, by "VERB resource[/subresource]" (every client)."""
    out: Counter[str] = Counter()
    for key, value in m1.items():
        if key.startswith("apiserver_request_total{"):
            lab = prom_labels(key)
            if lab.get("verb") in MUTATING:
                res = lab.get("resource", "") + ("/" + lab["subresource"] if lab.get("subresource") else "")
                out[f"{lab['verb']} {res}"] += value - m0.get(key, 0.0)
    return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v}


def apiserver_latency(m0: dict[str, float], m1: dict[str, float], verb: str, resource: str,
                      subresource: str = "") -> dict[str, float | None]:
    """p50/p99 (upper bucket bounds) of the API server's own request duration for one verb/resource."""
    out: dict[str, float | None] = {}
    for q in (0.5, 0.99):
        buckets: dict[float, float] = defaultdict(float)
        for key, value in m1.items():
            if key.startswith("apiserver_request_duration_seconds_bucket{"):
                lab = prom_labels(key)
                if (lab.get("verb") == verb and lab.get("resource") == resource
                        and lab.get("subresource", "") == subresource):
                    le = float("inf") if lab["le"] == "+Inf" else float(lab["le"])
                    buckets[le] += value - m0.get(key, 0.0)
        rows = sorted(buckets.items())
        out[f"p{int(q * 100)}_s"] = (next(le for le, n in rows if n >= q * rows[-1][1])
                                     if rows and rows[-1][1] > 0 else None)
    return out


def mutating_p99(m0: dict[str, float], m1: dict[str, float], q: float = 0.99) -> float | None:
    """Upper bucket bound holding quantile ``q`` of every mutating request the API server served (all
    resources, all clients; WATCH/CONNECT excluded) between two scrapes."""
    buckets: dict[float, float] = defaultdict(float)
    for key, value in m1.items():
        if key.startswith("apiserver_request_duration_seconds_bucket{"):
            lab = prom_labels(key)
            if lab.get("verb") in MUTATING:
                le = float("inf") if lab["le"] == "+Inf" else float(lab["le"])
                buckets[le] += value - m0.get(key, 0.0)
    rows = sorted(buckets.items())
    if not rows or rows[-1][1] <= 0:
        return None
    return next(le for le, n in rows if n >= q * rows[-1][1])


def versions(cluster: Any) -> dict[str, str]:
    import aiohttp
    import kopf

    from fleetlet import __version__

    def first_line(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.splitlines()[0].strip()
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    b = cluster.binaries
    return {"fleetlet": __version__, "kubernetes": first_line(b["kube-apiserver"], "--version"),
            "etcd": first_line(b["etcd"], "--version"), "python": platform.python_version(),
            "aiohttp": aiohttp.__version__, "kopf": getattr(kopf, "__version__", "?")}


def component_pids(cluster: Any) -> dict[str, int]:
    return {c.name: c.process.pid for c in cluster.components if c.process is not None and c.process.poll() is None}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the pod watcher: a separate process, so its stamps do not wait on anything else --------------------------


def watcher_main(kubeconfig: str, namespace: str, conn: Any, stop: Any) -> None:
    asyncio.run(_watch_pods(kubeconfig, namespace, conn, stop))


async def _watch_pods(kubeconfig: str, namespace: str, conn: Any, stop: Any) -> None:
    from fleetlet.kube import KubeClient, KubeConfig, resource_path

    pods: dict[str, dict[str, Any]] = {}

    def handle(kind: str, obj: dict[str, Any]) -> None:
        now, wall = time.monotonic(), time.time()
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        if LABEL_JOB_UID not in labels:
            return
        p = pods.get(meta["uid"])
        if p is None:
            try:
                job, shard, replica, attempt = meta["name"].rsplit("-", 3)
                ident = (int(shard), int(replica), int(attempt))
            except ValueError:
                return
            p = pods[meta["uid"]] = {"name": meta["name"], "job": job, "shard": ident[0], "replica": ident[1],
                                     "attempt": ident[2], "created": meta.get("creationTimestamp"), "seen": now,
                                     "seen_wall": wall}
        node = (obj.get("spec") or {}).get("nodeName")
        if node and "bound" not in p:
            p["bound"], p["node"] = now, node
        status = obj.get("status") or {}
        phase = status.get("phase")
        if phase == "Running" and "running" not in p:
            p["running"], p["running_wall"] = now, wall
        if phase in ("Succeeded", "Failed") and "final" not in p:
            p["final"], p["phase"], p["reason"] = now, phase, status.get("reason")
        if kind == "DELETED":
            p.setdefault("deleted", now)

    def summary() -> dict[str, Any]:
        jobs: dict[str, Counter[str]] = defaultdict(Counter)
        last_bound: dict[str, float] = {}
        for p in pods.values():
            c = jobs[p["job"]]
            c["seen"] += 1
            first = p["attempt"] == 0 and p["replica"] == 0
            c["first_seen"] += first
            if "bound" in p:
                c["bound"] += 1
                c["first_bound"] += first
                if first:
                    last_bound[p["job"]] = max(last_bound.get(p["job"], 0.0), p["bound"])
            c["running"] += "running" in p
            if "final" in p:
                c[p["phase"]] += 1
        return {"t": time.monotonic(), "jobs": {j: dict(c) for j, c in jobs.items()}, "last_bound": last_bound}

    async with KubeClient(KubeConfig.load(kubeconfig)) as kube:
        path = resource_path("v1", "pods", namespace)
        params = {"labelSelector": LABEL_JOB_UID}
        synced = asyncio.Event()

        task = asyncio.create_task(follow(kube, path, params, handle, synced, "pod watcher"))
        await synced.wait()
        conn.send("synced")
        while not stop.is_set():
            await asyncio.sleep(2.0)
            conn.send(summary())
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    conn.send({"pods": pods})


class PodWatcher:
    def __init__(self, kubeconfig: Path, namespace: str = NS) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._stop = ctx.Event()
        self.process = ctx.Process(target=watcher_main, args=(str(kubeconfig), namespace, child, self._stop),
                                   daemon=True)
        self.latest: dict[str, Any] = {"jobs": {}, "last_bound": {}}
        self.timeline: list[dict[str, Any]] = []

    def start(self) -> None:
        self.process.start()
        if self._conn.recv() != "synced":
            raise RuntimeError("the pod watcher did not sync")

    def poll(self) -> dict[str, Any]:
        while self._conn.poll():
            msg = self._conn.recv()
            if isinstance(msg, dict) and "jobs" in msg:
                self.latest = msg
                self.timeline.append(msg)
        return self.latest

    def job(self, name: str) -> dict[str, int]:
        return dict(self.poll()["jobs"].get(name, {}))

    def stop(self) -> dict[str, dict[str, Any]]:
        self._stop.set()
        while True:
            msg = self._conn.recv()
            if isinstance(msg, dict) and "pods" in msg:
                self.process.join(timeout=30)
                return dict(msg["pods"])
            if isinstance(msg, dict) and "jobs" in msg:
                self.timeline.append(msg)


# ---- the SIMULATED fleet: a child process running SimFleetHarness with a recording runner ---------------------


def _pick(key: str, p: float, seed: int) -> bool:
    h = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < p


def worker_main(cfg_path: str) -> None:
    """``bench_operator.py --worker CFG``: one process of SIMULATED cars (real agents); records every run."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = json.loads(Path(cfg_path).read_text())
    ca = (Path(cfg["ca_crt"]).read_bytes(), Path(cfg["ca_key"]).read_bytes())
    out = asyncio.run(_worker(cfg, *ca))
    Path(cfg["out"]).write_text(json.dumps(out))
    print("worker: done", flush=True)


async def _worker(cfg: dict[str, Any], ca_crt: bytes, ca_key: bytes) -> dict[str, Any]:
    from fleetlet_car.agent import AgentConfig
    from fleetlet_car.runtime import RunSpec
    from fleetlet_car.sim.compute import SimulatedCompute, SimulatedRun
    from fleetlet_car.sim.runner import SimFleetHarness

    from fleetlet.api.v1alpha1 import VehicleNodeSpec
    from fleetlet.pki import CAR_ORGANIZATION, CertificateAuthority, KeyPair

    loop = asyncio.get_running_loop()
    rate = float(cfg["rate"])
    records: list[dict[str, Any]] = []
    drives: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # assignment uid -> pod name (from the shim's assign)
    driving: set[str] = set()
    liars = set(cfg["liars"])
    harness_ref: list[SimFleetHarness] = []

    interrupted: set[str] = set()  # shards whose run a departure stopped (each shard counted once)
    cap = cfg["interrupt_share"] * cfg["expected_shards"]

    def depart(car: str) -> None:
        if car in driving or not harness_ref or len(interrupted) >= cap:
            return  # the target share of interrupted shards is reached: no more departures
        for r in records:
            if r["car"] == car and r.get("t_end") is None and r["pod"]:
                interrupted.add(r["pod"].rsplit("-", 3)[1])
        driving.add(car)
        drives.append({"car": car, "at": time.monotonic()})
        harness_ref[0].set_drive_state(car, "Driving")  # SIMULATED departure: the car's reflex stops its work
        loop.call_later(cfg["away_s"], park, car)

    def park(car: str) -> None:
        harness_ref[0].set_drive_state(car, "Parked")
        driving.discard(car)

    class RecordingRun(SimulatedRun):
        def __init__(self, spec: RunSpec, rec: dict[str, Any], lie: bool, interrupt: bool) -> None:
            super().__init__(spec, rate, lie=lie, progress_interval=cfg["progress_interval"])
            self.rec = rec
            self.interrupt = interrupt

        def _prepare(self, fingerprint: str) -> int:
            done = super()._prepare(fingerprint)
            self.rec["from"] = done
            self.rec["t_compute"] = time.monotonic()
            return done

        async def _work(self) -> Any:
            rec = self.rec
            shard = self.spec.shard
            rec["total"] = (shard.end - shard.start) if shard is not None else 0
            if self.interrupt:
                # A random point of the work left (resumes are not interrupted on purpose; see the caller).
                left = rec["total"] / rate
                loop.call_later(random.uniform(0.1, 0.9) * left, depart, rec["car"])
            result = await super()._work()
            rec.update(t_end=time.monotonic(), reason=result.reason.value, done=result.items_done,
                       digest=result.result_sha256, departed=rec["car"] in driving)
            return result

    class RecordingCompute(SimulatedCompute):
        def run(self, spec: RunSpec) -> SimulatedRun:
            parts = Path(spec.work_dir).parts  # .../cars/<car>/runs/<uid>/sandbox
            car, uid = parts[-4], parts[-2]
            name = names.get(uid, "")
            model = spec.shard.model_sha256 if spec.shard is not None else ""
            lie = car in liars and model == cfg["lie_model"]
            interrupt = False
            try:
                _, shard, replica, attempt = name.rsplit("-", 3)
                interrupt = (model == cfg["interrupt_model"] and replica == "0" and attempt == "0"
                             and _pick(shard, cfg["interrupt_p"], cfg["seed"]))
            except ValueError:
                pass
            rec = {"car": car, "uid": uid, "pod": name, "lie": lie, "t_start": time.monotonic(), "from": 0,
                   "interrupt": interrupt}
            records.append(rec)
            return RecordingRun(spec, rec, lie, interrupt)

    specs = [VehicleNodeSpec.model_validate(s) for s in cfg["specs"]]
    ca = CertificateAuthority(KeyPair(ca_crt, ca_key))
    config = AgentConfig(checkpoint_every_seconds=cfg["checkpoint_s"], status_interval_seconds=cfg["status_s"],
                         log_interval_seconds=cfg["log_s"])
    harness = SimFleetHarness(
        len(specs), cfg["shim_url"], ca.cert_pem,
        lambda name: ca.issue(name, organizations=(CAR_ORGANIZATION,), client=True),
        cfg["work_dir"], seed=cfg["seed"], config=config, specs=specs, schedules=False,
        runner=RecordingCompute(rate, progress_interval=cfg["progress_interval"]),
    )
    harness_ref.append(harness)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await harness.start()
    for i in range(len(specs)):  # parked, plugged in, charged: every car may work now
        harness.fleet.set_state_of_charge(i, 0.9)
        harness.fleet.set_plugged_in(i, True)
        harness.fleet.set_drive_state(i, "Parked")
    for agent in harness.agents.values():
        original = agent._on_assign

        def on_assign(msg: Any, original: Callable[[Any], None] = original) -> None:
            names[msg.uid] = msg.name
            original(msg)

        agent._on_assign = on_assign  # type: ignore[method-assign]
    print(f"worker: {len(specs)} SIMULATED cars started", flush=True)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await stop.wait()
        s = harness.stats()
        print(f"worker: {s.connected}/{s.cars} connected, {s.running} running, {len(records)} runs, "
              f"{len(drives)} departures", flush=True)
    await harness.stop()
    return {"records": records, "drives": drives}


class FleetProcess:
    def __init__(self, index: int, cfg: dict[str, Any], work: Path) -> None:
        self.index = index
        self.cfg_path = work / f"fleet-{index}.json"
        self.out = work / f"fleet-{index}-records.json"
        cfg = {**cfg, "out": str(self.out), "work_dir": str(work / f"fleet-{index}")}
        self.cfg_path.write_text(json.dumps(cfg))
        self.log_path = work / f"fleet-{index}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                             str(self.cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def stop(self, timeout: float = 180.0) -> dict[str, Any]:
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        try:
            return dict(json.loads(self.out.read_text()))
        except (OSError, ValueError):
            return {"records": [], "drives": []}


class Profiler:
    """py-spy (optional; ``--py-spy``) sampling one process without pausing it; ``stop()`` returns where its time
    went: the leaf functions (self time) and the Fleetlet functions on the stack (inclusive), as shares of
    the samples."""

    def __init__(self, binary: str, pid: int, out: Path, rate: int = 50) -> None:
        self.out = out
        self.process = subprocess.Popen([binary, "record", "--pid", str(pid), "--format", "raw", "--output",
                                         str(out), "--rate", str(rate), "--nonblocking", "--duration", "3600"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)

    def stop(self, top: int = 20) -> dict[str, Any]:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        try:
            lines = self.out.read_text().splitlines()
        except OSError:
            return {"error": "py-spy wrote nothing"}
        leaf: Counter[str] = Counter()
        ours: Counter[str] = Counter()
        idle = total = 0
        for line in lines:
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            last = frames[-1]
            if "select (selectors.py" in last or "_run_once" in last and len(frames) < 6:
                idle += n
                continue
            leaf[_frame(last)] += n
            for f in dict.fromkeys(_frame(x) for x in frames if "fleetlet" in x):
                ours[f] += n
        busy = max(1, total - idle)
        return {"samples": total, "idle_share": round(idle / max(1, total), 3),
                "top_self_share_of_busy": [(k, round(v / busy, 3)) for k, v in leaf.most_common(top)],
                "top_fleetlet_inclusive_share_of_busy": [(k, round(v / busy, 3)) for k, v in ours.most_common(top)]}


def _frame(raw: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py:123)``."""
    name, _, where = raw.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


# ---- setting up -------------------------------------------------------------------------------------------------


def car_specs(n: int, seed: int) -> list[Any]:
    """Seeded car specs whose owners lend them at any hour down to 30 % charge (the tests' lend_any_time):
    this benchmark is about jobs, not about owners' windows (bench_carstate.py runs the owners' policies)."""
    from fleetlet_car.sim import make_vehicle_specs

    out = []
    for s in make_vehicle_specs(n, seed):
        policy = s.policy.model_copy(update={"require_plugged_in": False, "min_state_of_charge": 0.3,
                                             "availability": [], "max_energy_per_day_kwh": 50.0})
        out.append(s.model_copy(update={"policy": policy}))
    return out


def vn_bodies(specs: list[Any]) -> list[dict[str, Any]]:
    from fleetlet.api.v1alpha1 import VehicleNode

    return [VehicleNode(metadata={"name": s.vehicle_id}, spec=s).wire(exclude={"status"})  # type: ignore[arg-type]
            for s in specs]


class BenchCluster:
    """LocalCluster, plus restarting the kube-scheduler with other client flags (phase 3)."""

    @staticmethod
    def restart_scheduler(cluster: Any, extra: list[str]) -> int:
        comp = next(c for c in cluster.components if c.name == "kube-scheduler" and c.process is not None
                    and c.process.poll() is None)
        assert comp.process is not None
        os.killpg(comp.process.pid, signal.SIGTERM)
        comp.process.wait(timeout=30)
        cluster.components.remove(comp)
        cluster._spawn("kube-scheduler", [*comp.args, *extra])
        deadline = time.monotonic() + 60
        url = f"https://127.0.0.1:{cluster.ports['scheduler']}/healthz"
        while not cluster._https_ok(url):
            if time.monotonic() > deadline:
                raise RuntimeError("the kube-scheduler did not come back")
            time.sleep(0.5)
        return int(cluster.components[-1].process.pid)


async def gather_limited(n: int, coros: Iterable[Any]) -> list[Any]:
    gate = asyncio.Semaphore(n)

    async def one(c: Any) -> Any:
        async with gate:
            return await c

    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)


async def until(what: str, check: Callable[[], Any], timeout_s: float, interval_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(check) if not asyncio.iscoroutinefunction(check) else await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for: {what}")
        await asyncio.sleep(interval_s)


def operator_vn_patches(op: Any) -> float:
    m = op.metrics()
    return sum(v for k, v in m.items() if k.startswith("fleetlet_operator_api_calls_total{")
               and 'verb="PATCH"' in k and "vehiclenodes" in k and 'code="200"' in k)


# ---- the analysis -----------------------------------------------------------------------------------------------


def placement_figures(pods: dict[str, dict[str, Any]], job: str, t0: float, shards: int) -> dict[str, Any]:
    mine = [p for p in pods.values() if p["job"] == job]
    first = [p for p in mine if p["attempt"] == 0 and p["replica"] == 0]
    seen = sorted(p["seen"] - t0 for p in first)
    bound = sorted(p["bound"] - t0 for p in first if "bound" in p)
    out: dict[str, Any] = {"shards": shards, "first_attempt_pods_seen": len(seen), "bound": len(bound)}
    if len(bound) >= shards:
        all_bound = bound[shards - 1]
        out["seconds_job_created_to_all_bound"] = round(all_bound, 2)
        out["shards_placed_per_second"] = round(shards / all_bound, 1)
    else:
        out["seconds_job_created_to_all_bound"] = None
        out["shards_placed_per_second"] = None
        out["note"] = f"only {len(bound)} of {shards} shards were bound"
    if bound:
        lo, hi = bound[int(0.1 * (len(bound) - 1))], bound[int(0.9 * (len(bound) - 1))]
        out["bind_rate_10_to_90_percent_per_second"] = round(0.8 * len(bound) / max(1e-6, hi - lo), 1)
        out["first_bound_s"] = round(bound[0], 2)
    if seen:
        lo, hi = seen[int(0.1 * (len(seen) - 1))], seen[int(0.9 * (len(seen) - 1))]
        out["operator"] = {
            "first_pod_seen_s": round(seen[0], 2), "last_pod_seen_s": round(seen[-1], 2),
            "pods_created_per_second_overall": round(len(seen) / max(1e-6, seen[-1]), 1),
            "pods_created_per_second_10_to_90_percent": round(0.8 * len(seen) / max(1e-6, hi - lo), 1)}
    out["pod_seen_to_bound_s"] = quantiles(p["bound"] - p["seen"] for p in first if "bound" in p)
    out["pod_bound_to_running_s"] = quantiles(p["running"] - p["bound"] for p in first
                                              if "running" in p and "bound" in p)
    out["pod_created_to_running_s"] = quantiles(p["running"] - p["seen"] for p in first if "running" in p)
    out["pod_created_to_running_all_attempts_s"] = quantiles(p["running"] - p["seen"] for p in mine
                                                             if "running" in p)

    def created_wall(p: dict[str, Any]) -> float:
        return datetime.fromisoformat(p["created"].replace("Z", "+00:00")).timestamp()

    out["pod_creation_timestamp_to_running_s"] = quantiles(
        p["running_wall"] - created_wall(p) for p in first if "running_wall" in p and p.get("created"))
    out["first_attempt_pods_never_running"] = sum(1 for p in first if "running" not in p)
    return out


def work_figures(records: list[dict[str, Any]], job: str, accepted: dict[int, str], rate: float,
                 shards: int) -> dict[str, Any]:
    """Car compute (items; SIMULATED compute runs at ``rate`` items/s) by what became of it."""
    chains: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        try:
            j, shard, replica, attempt = r["pod"].rsplit("-", 3)
        except ValueError:
            continue
        if j != job:
            continue
        r = {**r, "shard": int(shard), "replica": int(replica), "attempt": int(attempt)}
        if r.get("t_compute") is not None and r.get("t_end") is not None:
            cap = max(0, r.get("total", 0) - r.get("from", 0))
            r["computed"] = cap if r.get("reason") == "Completed" else min(cap, max(0.0, r["t_end"] - r["t_compute"])
                                                                           * rate)
        else:
            r["computed"] = 0.0
        chains[(r["shard"], r["replica"])].append(r)
    total = useful = lost = 0.0
    by_role: dict[str, float] = defaultdict(float)
    wasted: dict[str, float] = defaultdict(float)
    useful_primary = 0.0
    interrupted: set[int] = set()
    departures_runs = 0
    runs = 0
    for (shard, replica), chain in chains.items():
        chain.sort(key=lambda r: (r["attempt"], r["t_start"]))
        computed = sum(r["computed"] for r in chain)
        runs += len(chain)
        total += computed
        by_role["primary" if replica == 0 else "verification"] += computed
        for r in chain:
            if r.get("departed") and r.get("reason") != "Completed":
                interrupted.add(shard)
                departures_runs += 1
        digest = accepted.get(shard)
        winner = next((r for r in chain if r.get("reason") == "Completed" and r.get("digest") == digest), None)
        if winner is not None and digest:
            items = winner.get("total", 0)
            useful += items
            if replica == 0:
                useful_primary += items
            lost += max(0.0, computed - items)
        elif any(r.get("lie") and r.get("reason") == "Completed" for r in chain):
            wasted["wrong_results_rejected"] += computed
        elif any(r.get("reason") == "Completed" for r in chain):
            wasted["results_not_accepted"] += computed
        else:
            wasted["stopped_before_a_result"] += computed
    safe = max(total, 1e-9)
    return {
        "runs": runs,
        "compute_items_total": round(total),
        "compute_seconds_total": round(total / rate, 1),
        "shards_interrupted_by_departures": len(interrupted),
        "shards_interrupted_share": round(len(interrupted) / shards, 4),
        "runs_ended_by_departures": departures_runs,
        "useful_items": round(useful),
        "useful_work_ratio": round(useful / safe, 4),
        "useful_work_ratio_primary_only": round(useful_primary / safe, 4),
        "redone_items": round(lost),
        "redone_work_share": round(lost / safe, 4),
        "wasted_items": {k: round(v) for k, v in wasted.items()},
        "primary_compute_items": round(by_role["primary"]),
        "verification_compute_items": round(by_role["verification"]),
        "verification_overhead": round(by_role["verification"] / max(by_role["primary"], 1e-9), 4),
    }


def liar_figures(records: list[dict[str, Any]], job: str, accepted: dict[int, str], liars: list[str],
                 trust: dict[str, dict[str, Any]]) -> dict[str, Any]:
    wrong = caught = 0
    per: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        try:
            j, shard, _, _ = r["pod"].rsplit("-", 3)
        except ValueError:
            continue
        if j != job or not r.get("lie") or r.get("reason") != "Completed":
            continue
        wrong += 1
        per[r["car"]]["wrong_results"] += 1
        if accepted.get(int(shard)) != r.get("digest"):
            caught += 1
            per[r["car"]]["caught"] += 1
    return {
        "liars": len(liars),
        "wrong_results": wrong,
        "caught": caught,
        "accepted_into_the_output": wrong - caught,
        "caught_share": round(caught / wrong, 4) if wrong else None,
        "per_liar": {car: {**dict(per.get(car, {})), "untrusted": bool(trust.get(car, {}).get("untrusted")),
                           "validStreak": trust.get(car, {}).get("validStreak")} for car in liars},
    }


def analysis(f: dict[str, Any]) -> list[str]:
    """Plain sentences derived from the figures (what bounds what); the numbers are in the sections above."""
    out: list[str] = []
    pl = f["placement"]
    w = pl["where_the_time_goes"]
    sch, op = w["scheduler"], pl.get("operator", {})
    out.append(f"placement: the operator created pods at {op.get('pods_created_per_second_10_to_90_percent')}/s "
               f"(10-90 % of them), the kube-scheduler bound {sch['scheduled_per_second']}/s over the window "
               f"(its client QPS limit: {sch['client_qps_limit']}); the slower of the two sets the placement rate.")
    out.append(f"pod seen -> bound p50 {pl['pod_seen_to_bound_s'].get('p50')} s (scheduler queue + bind call), "
               f"bound -> Running p50 {pl['pod_bound_to_running_s'].get('p50')} s / p99 "
               f"{pl['pod_bound_to_running_s'].get('p99')} s (shim dispatch, the car fetching and starting, the "
               "shim writing the status).")
    cores = w["cpu_cores_by_process"]
    busy = sorted(cores.items(), key=lambda kv: -kv[1])
    busy = [(k, v) for k, v in busy if not k.startswith("_")]
    out.append(f"CPU while placing: {cores.get('_machine', 0):.2f} of {os.cpu_count()} cores busy on the machine "
               f"({sum(v for _, v in busy):.2f} by the benchmark's processes); by process: "
               + ", ".join(f"{k} {v:.2f}" for k, v in busy[:6]) + ".")
    prof = w.get("py_spy_profiles_creation_to_all_bound")
    if isinstance(prof, dict) and "operator" in prof and "top_fleetlet_inclusive_share_of_busy" in prof["operator"]:
        top = [f"{k} {v:.0%}" for k, v in prof["operator"]["top_fleetlet_inclusive_share_of_busy"][:8]]
        out.append("operator samples while placing (py-spy, inclusive): " + "; ".join(top))
    if "placement_scheduler_qps_raised" in f:
        r = f["placement_scheduler_qps_raised"]
        out.append(f"with the scheduler's client QPS raised, placement ran at {r.get('shards_placed_per_second')} "
                   f"shards/s; the operator created pods at "
                   f"{r.get('operator', {}).get('pods_created_per_second_10_to_90_percent')}/s.")
    uw = f["useful_work"]
    out.append(f"useful work: {uw['shards_interrupted_share']:.0%} of shards interrupted by departures; "
               f"{uw['redone_work_share']:.1%} of car compute was redone (work after the last checkpoint is lost "
               f"when a car drives off: the reflex kills the sandbox at once), "
               f"{uw['verification_compute_items'] / max(1, uw['compute_items_total']):.1%} went to audits.")
    if "verification" in f:
        li = f["verification"]["liars"]
        out.append(f"lying cars: {li['caught']} of {li['wrong_results']} wrong results caught. A car with an "
                   "established streak is audited with probability max(spotCheckRate, 1/streak) per shard, and "
                   "results accepted before it is caught are not re-verified: with a 5 % rate most lies pass.")
    return out


def target(name: str, value: Any, goal: str, met: bool | None) -> dict[str, Any]:
    return {"target": name, "value": value, "goal": goal, "met": met}


# ---- the run ----------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="fleetlet-bench-operator-"))
        self.sampler = Sampler(1.0)
        self.out: dict[str, Any] = {}
        self.cluster: Any = None
        self.shim: Any = None
        self.operator: Any = None
        self.fleet: list[FleetProcess] = []
        self.watcher: PodWatcher | None = None
        self.kube: Any = None
        self.t_start = time.monotonic()

    # ---- helpers --------------------------------------------------------------------------------------------

    async def job_status(self, name: str) -> dict[str, Any]:
        from fleetlet.api.v1alpha1.meta import API_VERSION
        from fleetlet.kube import resource_path

        body = await self.kube.get(resource_path(API_VERSION, "fleetjobs", NS, name))
        return dict(body)

    async def ledger(self, uid: str) -> dict[int, str]:
        from fleetlet.kube import resource_path

        accepted: dict[int, str] = {}
        listed = await self.kube.list(resource_path("v1", "configmaps", NS), labelSelector=f"fleetlet.io/ledger={uid}")
        for cm in listed["items"]:
            for shard, entry in json.loads((cm.get("data") or {}).get("shards") or "{}").items():
                if entry.get("a"):
                    accepted[int(shard)] = entry["a"]
        return accepted

    async def trust(self, cars: list[str]) -> dict[str, dict[str, Any]]:
        from fleetlet.api.v1alpha1.meta import API_VERSION
        from fleetlet.kube import resource_path

        out = {}
        for car in cars:
            vn = await self.kube.get(resource_path(API_VERSION, "vehiclenodes", name=car))
            out[car] = dict((vn.get("status") or {}).get("trust") or {})
        return out

    async def submit(self, name: str, model: str, data: str, items: int) -> tuple[float, str]:
        from fleetlet.api.v1alpha1.meta import API_VERSION
        from fleetlet.kube import resource_path

        a = self.args
        body = {
            "apiVersion": "fleetlet.io/v1alpha1", "kind": "FleetJob",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"model": {"uri": f"fleetlet://sha256/{model}", "sha256": model},
                     "input": {"uri": f"fleetlet://sha256/{data}", "format": "npy", "items": items},
                     "shardSize": a.shard_size, "parallelism": a.shards,
                     "resources": {"cpu": "1", "memory": "512Mi"},
                     "verification": {"replicas": 1, "quorum": 1, "spotCheckRate": a.spot_check},
                     "retries": 3},
        }
        t0 = time.monotonic()
        made = await self.kube.create(resource_path(API_VERSION, "fleetjobs", NS), body)
        return t0, str(made["metadata"]["uid"])

    def metrics_snapshot(self) -> dict[str, dict[str, float]]:
        snap: dict[str, dict[str, float]] = {}
        for name, fn in (("apiserver", lambda: apiserver_metrics(self.cluster)),
                         ("scheduler", lambda: scheduler_metrics(self.cluster)),
                         ("operator", lambda: self.operator.metrics()), ("shim", lambda: self.shim.metrics())):
            try:
                snap[name] = fn()
            except Exception as exc:  # noqa: BLE001 - a figure missing is said, the run goes on
                say(f"scrape of {name} failed: {exc!r}")
                snap[name] = {}
        return snap

    async def run_job(self, name: str, model: str, data: str, items: int, *, wait_complete: bool = True,
                      timeout_s: float = 3600.0) -> dict[str, Any]:
        """Create the job, follow it, return its timings (monotonic) and metric snapshots."""
        assert self.watcher is not None
        a = self.args
        m0 = await asyncio.to_thread(self.metrics_snapshot)
        profilers: dict[str, Profiler] = {}
        if a.py_spy and name in ("place", "replace"):
            for who, handle in (("operator", self.operator), ("shim", self.shim)):
                profilers[who] = Profiler(a.py_spy, handle.process.pid, self.work / f"py-spy-{name}-{who}.txt")
        t0, uid = await self.submit(name, model, data, items)
        say(f"job {name}: created ({a.shards} shards of {a.shard_size} items)")
        t_bound = t_running = None
        m_bound: dict[str, dict[str, float]] = {}
        profiles: dict[str, Any] = {}
        last_print = 0.0
        status: dict[str, Any] = {}
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            c = self.watcher.job(name)
            if t_bound is None and c.get("first_bound", 0) >= a.shards:
                t_bound = self.watcher.latest["last_bound"].get(name, now)
                m_bound = await asyncio.to_thread(self.metrics_snapshot)
                say(f"job {name}: all {a.shards} shards bound {t_bound - t0:.1f}s after creation")
                profiles = {who: await asyncio.to_thread(p.stop) for who, p in profilers.items()}
                profilers = {}
            if t_running is None and c.get("running", 0) >= a.shards:
                t_running = now
            if now - last_print >= 10:
                last_print = now
                with contextlib.suppress(Exception):
                    status = (await self.job_status(name)).get("status") or {}
                rss = self.sampler.rss("operator", now)
                say(f"job {name} +{now - t0:.0f}s: pods seen {c.get('seen', 0)}, bound {c.get('bound', 0)}, "
                    f"ran {c.get('running', 0)}, succeeded {c.get('Succeeded', 0)}, failed {c.get('Failed', 0)}; "
                    f"job {status.get('phase')} {status.get('shards')}; operator RSS {rss} MiB")
                if status.get("phase") in ("Succeeded", "Failed") and (t_bound is not None or not wait_complete):
                    break
            if not wait_complete and t_bound is not None and (t_running is not None or now - t_bound > 60):
                break
            if now - t0 > timeout_s:
                say(f"job {name}: timed out after {timeout_s:.0f}s")
                break
        t_end = time.monotonic()
        for who, prof in profilers.items():
            profiles[who] = await asyncio.to_thread(prof.stop)
        with contextlib.suppress(Exception):
            status = (await self.job_status(name)).get("status") or {}
        m1 = await asyncio.to_thread(self.metrics_snapshot)
        return {"name": name, "uid": uid, "t0": t0, "t_bound": t_bound, "t_running": t_running, "t_end": t_end,
                "m0": m0, "m_bound": m_bound, "m1": m1, "status": status, "profiles": profiles}

    def where_time_goes(self, job: dict[str, Any]) -> dict[str, Any]:
        """The components' own figures over the placement window (creation -> all bound)."""
        m0, m1 = job["m0"], job["m_bound"] or job["m1"]
        t1 = job["t_bound"] or job["t_end"]
        a0, a1 = m0.get("apiserver", {}), m1.get("apiserver", {})
        s0, s1 = m0.get("scheduler", {}), m1.get("scheduler", {})
        o0, o1 = m0.get("operator", {}), m1.get("operator", {})
        window = max(1e-6, t1 - job["t0"])
        attempts = {k: round(prom_sum(s1, "scheduler_schedule_attempts_total", result=k)
                             - prom_sum(s0, "scheduler_schedule_attempts_total", result=k))
                    for k in ("scheduled", "unschedulable", "error")}
        return {
            "py_spy_profiles_creation_to_all_bound": job.get("profiles") or "not taken (no py-spy: --py-spy BIN)",
            "window_seconds": round(window, 2),
            "cpu_cores_by_process": self.sampler.cores(job["t0"], t1),
            "apiserver_writes_per_second": {k: round(v / window, 1)
                                            for k, v in list(apiserver_writes(a0, a1).items())[:12]},
            "apiserver_latency": {
                "POST pods": apiserver_latency(a0, a1, "POST", "pods"),
                "POST pods/binding": apiserver_latency(a0, a1, "POST", "pods", "binding"),
                "PATCH pods/status": apiserver_latency(a0, a1, "PATCH", "pods", "status"),
                "PATCH leases": apiserver_latency(a0, a1, "PATCH", "leases"),
            },
            "scheduler": {
                "attempts": attempts,
                "scheduled_per_second": round(attempts["scheduled"] / window, 1),
                "attempt_seconds_p50": prom_quantile(s1, "scheduler_scheduling_attempt_duration_seconds", 0.5, s0,
                                                     result="scheduled"),
                "attempt_seconds_p99": prom_quantile(s1, "scheduler_scheduling_attempt_duration_seconds", 0.99,
                                                     s0, result="scheduled"),
                "pod_scheduling_sli_seconds_p99": prom_quantile(s1, "scheduler_pod_scheduling_sli_duration_seconds",
                                                                0.99, s0),
                "client_qps_limit": self.out.get(
                    "scheduler_client_qps",
                    f"{self.cluster.scheduler_api_qps} (the embedded control plane's --kube-api-qps; "
                    "kube-scheduler's default is 50)"),
            },
            "operator": {
                "pods_created": round(prom_sum(o1, "fleetlet_operator_pods_created_total")
                                      - prom_sum(o0, "fleetlet_operator_pods_created_total")),
                "fleetjob_sync_seconds_p50": prom_quantile(o1, "fleetlet_operator_controller_sync_seconds", 0.5, o0,
                                                           controller="fleetjobs"),
                "fleetjob_sync_seconds_p99": prom_quantile(o1, "fleetlet_operator_controller_sync_seconds", 0.99,
                                                           o0, controller="fleetjobs"),
                "fleetjob_syncs": round(prom_sum(o1, "fleetlet_operator_controller_syncs_total",
                                                 controller="fleetjobs")
                                        - prom_sum(o0, "fleetlet_operator_controller_syncs_total",
                                                   controller="fleetjobs")),
                "api_post_seconds_p99": prom_quantile(o1, "fleetlet_operator_api_call_seconds", 0.99, o0,
                                                      verb="POST"),
            },
        }

    # ---- phases ---------------------------------------------------------------------------------------------

    async def setup_cluster(self) -> None:
        from fleetlet.localcluster import LocalCluster

        say(f"work dir {self.work}")
        self.cluster = LocalCluster(state_dir=self.work / "cp")
        if self.args.scheduler_qps:
            self.cluster.scheduler_api_qps = self.args.scheduler_qps
        await asyncio.to_thread(self.cluster.start)
        self.cluster.kubectl("apply", "--server-side", "-k", str(CRDS))
        self.cluster.kubectl("wait", "--for=condition=Established", "crd/vehiclenodes.fleetlet.io",
                             "crd/fleetjobs.fleetlet.io")
        for name, pid in component_pids(self.cluster).items():
            self.sampler.add(name, pid)
        self.sampler.start()
        from fleetlet.kube import KubeClient, KubeConfig

        self.kube = KubeClient(KubeConfig.load(str(self.cluster.kubeconfig)), max_connections=64)
        await self.kube.open()

    async def operator_memory(self, bodies: list[dict[str, Any]]) -> None:
        """Phase 0: the operator's RSS with 0, vn_small and all VehicleNodes (no shim, no cars yet)."""
        from fleetlet.cli.local import FleetCredentials, apply_objects, launch_operator

        a = self.args
        creds = FleetCredentials.create(self.work / "fleet-credentials")
        self.creds = creds
        store = self.work / "artifacts"
        store.mkdir()
        self.operator = await asyncio.to_thread(launch_operator, self.cluster, self.work / "operator",
                                                artifact_dir=store, local=self.cluster)
        self.sampler.add("operator", self.operator.process.pid)
        rows = []

        async def settle_and_measure(n: int) -> None:
            await asyncio.sleep(a.settle)
            _, rss = proc_stat(self.operator.process.pid)
            rows.append({"vehiclenodes": n, "operator_rss_mib": round(rss, 1)})
            say(f"operator RSS with {n} VehicleNodes: {rss:.1f} MiB")

        await settle_and_measure(0)
        steps = sorted({min(a.vn_small, len(bodies)), len(bodies)})
        done = 0
        for n in steps:
            chunk = bodies[done:n]
            for i in range(0, len(chunk), 500):
                await asyncio.to_thread(apply_objects, self.cluster, chunk[i:i + 500])
            done = n
            await until(f"the operator sees {n} VehicleNodes (its finalizer on each)",
                        lambda n=n: operator_vn_patches(self.operator) >= n, 600, 2.0)
            await settle_and_measure(n)
        small, full = rows[1], rows[-1]
        extra = (full["vehiclenodes"] - small["vehiclenodes"]) / 1000
        per_1000 = (full["operator_rss_mib"] - small["operator_rss_mib"]) / extra if extra else None
        self.out["operator_memory"] = {
            "method": f"RSS (/proc) of the operator process {a.settle:.0f}s after every VehicleNode got its "
                      "finalizer (the operator's informer holds them all); no shim, no cars, no jobs yet",
            "steps": rows,
            "mib_per_extra_1000_vehiclenodes": round(per_1000, 1) if per_1000 is not None else None,
        }

    async def seed_trust(self, names: list[str]) -> None:
        """An established fleet: every car's run of valid results is ``--trust-streak`` long."""
        from fleetlet.api.v1alpha1.meta import API_VERSION
        from fleetlet.kube import resource_path
        from fleetlet.kube.client import MERGE

        a = self.args
        body = {"status": {"trust": {"validStreak": a.trust_streak, "validTotal": a.trust_streak,
                                     "invalidTotal": 0, "untrusted": False}}}
        t = time.monotonic()
        results = await gather_limited(32, (self.kube.patch(resource_path(API_VERSION, "vehiclenodes", name=n,
                                                                          sub="status"), body, content_type=MERGE)
                                            for n in names))
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise RuntimeError(f"{len(errors)} trust seeds failed: {errors[0]!r}")
        say(f"seeded trust (validStreak {a.trust_streak}) on {len(names)} cars in {time.monotonic() - t:.1f}s")

    async def start_shim_and_fleet(self, specs: list[Any], models: dict[str, str]) -> None:
        from fleetlet.cli.local import launch_shim

        a = self.args
        self.shim = await asyncio.to_thread(
            launch_shim, self.cluster, self.work / "shim", lease_renew_s=25.0, local=self.cluster,
            heartbeat_s=30.0, dead_after_s=45.0, credentials=self.creds, artifact_dir=self.work / "artifacts")
        self.sampler.add("shim", self.shim.process.pid)
        ca_crt, ca_key = self.creds.ca.pair.write(self.work / "fleet-ca", "ca")
        self.watcher = PodWatcher(self.cluster.kubeconfig)
        await asyncio.to_thread(self.watcher.start)
        assert self.watcher.process.pid is not None
        self.sampler.add("watcher", self.watcher.process.pid)
        procs = a.fleet_procs or (1 if a.cars <= 1500 else 2)
        rng = random.Random(a.seed)
        self.liars = sorted(rng.sample([s.vehicle_id for s in specs], a.liars)) if a.liars else []
        common = {
            "shim_url": self.shim.link_url, "ca_crt": str(ca_crt), "ca_key": str(ca_key), "seed": a.seed,
            "rate": a.shard_size / a.shard_seconds, "progress_interval": a.progress_interval,
            "checkpoint_s": a.checkpoint_seconds, "status_s": a.status_interval, "log_s": a.log_interval,
            "liars": self.liars, "lie_model": models["verify"], "interrupt_model": models["place"],
            "interrupt_p": self.interrupt_p, "interrupt_share": a.interrupt, "away_s": a.away,
        }
        wire = [s.model_dump(mode="json", by_alias=True, exclude_none=True) for s in specs]
        for i in range(procs):
            part = wire[i::procs]
            fp = FleetProcess(i, {**common, "specs": part, "expected_shards": a.shards * len(part) / a.cars},
                              self.work)
            fp.start()
            assert fp.process is not None
            self.sampler.add(f"fleet-{i}", fp.process.pid)
            self.fleet.append(fp)
        t = time.monotonic()

        def ready() -> bool:
            m = self.shim.metrics()
            return bool(m.get("fleetlet_shim_nodes_ready", 0) >= a.cars)

        await until(f"{a.cars} cars connected and their Nodes Ready", ready, a.register_timeout, 2.0)
        say(f"{a.cars} SIMULATED cars Ready in {time.monotonic() - t:.1f}s ({procs} fleet processes)")

        async def schedulable() -> bool:
            from fleetlet.kube import resource_path

            listed = await self.kube.list(resource_path("v1", "nodes"), labelSelector="fleetlet.io/vehicle=true")
            keys = Counter(tt["key"] for n in listed["items"] for tt in n["spec"].get("taints", [])
                           if tt["key"] != "fleetlet.io/vehicle")
            bad = [n["metadata"]["name"] for n in listed["items"]
                   if any(tt["key"] != "fleetlet.io/vehicle" for tt in n["spec"].get("taints", []))]
            if bad:
                say(f"{len(bad)} car Nodes still carry a car-state taint: {dict(keys)}")
            return len(listed["items"]) >= a.cars and not bad

        await until("every car Node free of car-state taints", schedulable, 300, 5.0)
        # Registration's tail (each car's first Lease falls at a random point of its first 25 s, then the first
        # status mirrors) must not compete with the job being measured: a fleet that came up fast would look slow.
        say(f"letting registration's tail settle for {a.fleet_settle:.0f}s")
        await asyncio.sleep(a.fleet_settle)
        self.out["fleet"] = {"processes": procs, "seconds_to_all_ready": round(time.monotonic() - t, 1)}

    async def run(self) -> dict[str, Any]:
        from fleetlet.artifacts import BlobStore

        a = self.args
        # Candidates: 1.5x the share needed (a departure also stops the car's other shards); the cars stop
        # departing once the target share of shards was interrupted.
        self.interrupt_p = min(1.0, 1.5 * a.interrupt / max(1.0, a.shards / a.cars))
        await self.setup_cluster()
        self.out["versions"] = versions(self.cluster)
        specs = car_specs(a.cars, a.seed)
        bodies = vn_bodies(specs)
        await self.operator_memory(bodies)
        await self.seed_trust([s.vehicle_id for s in specs])
        # The job's artifacts: two SIMULATED models (phase 1 and 2) and one input (the shards' blobs are the
        # operator's, made per pod).
        store = BlobStore(self.work / "artifacts")
        root = self.work / "inputs"
        root.mkdir()
        items = a.shards * a.shard_size
        models = {}
        for job in ("place", "verify", "replace"):
            (root / f"{job}.onnx").write_bytes(f"SIMULATED model for job {job}: no model runs".encode())
            models[job] = store.put_file(root / f"{job}.onnx")
        np.save(root / "input.npy", np.arange(items, dtype=np.float32).reshape(items, 1))
        data = store.put_file(root / "input.npy")
        await self.start_shim_and_fleet(specs, models)
        await asyncio.sleep(5)
        _, rss_before = proc_stat(self.operator.process.pid)
        self.out["operator_memory"]["rss_before_jobs_with_all_cars_mib"] = round(rss_before, 1)

        # ---- phase 1 ------------------------------------------------------------------------------------
        place = await self.run_job("place", models["place"], data, items, timeout_s=a.job_timeout)
        self.jobs = {"place": place}
        # ---- phase 2 ------------------------------------------------------------------------------------
        if not a.skip_verify:
            await asyncio.sleep(10)  # the operator deletes place's pods; let that settle
            self.jobs["verify"] = await self.run_job("verify", models["verify"], data, items,
                                                     timeout_s=a.job_timeout)
        # ---- phase 3 ------------------------------------------------------------------------------------
        if a.rerun_scheduler_qps:
            await asyncio.sleep(10)
            q = a.rerun_scheduler_qps
            say(f"restarting the kube-scheduler with --kube-api-qps={q} --kube-api-burst={2 * q}")
            pid = await asyncio.to_thread(BenchCluster.restart_scheduler, self.cluster,
                                          [f"--kube-api-qps={q}", f"--kube-api-burst={2 * q}"])
            self.sampler.add("kube-scheduler", pid)
            self.out["scheduler_client_qps"] = f"{q} (restarted with --kube-api-qps={q})"
            self.jobs["replace"] = await self.run_job("replace", models["replace"], data, items,
                                                      wait_complete=False, timeout_s=a.job_timeout)
        return await self.finish()

    async def finish(self) -> dict[str, Any]:
        a = self.args
        say("stopping the fleet and collecting the cars' records")
        results = await asyncio.gather(*(asyncio.to_thread(fp.stop) for fp in self.fleet))
        records = [r for res in results for r in res["records"]]
        drives = [d for res in results for d in res["drives"]]
        assert self.watcher is not None
        pods = await asyncio.to_thread(self.watcher.stop)
        rate = a.shard_size / a.shard_seconds
        figures: dict[str, Any] = {}
        place = self.jobs["place"]
        t_end_place = place["t_end"]
        figures["placement"] = placement_figures(pods, "place", place["t0"], a.shards)
        figures["placement"]["where_the_time_goes"] = self.where_time_goes(place)
        figures["placement"]["job_status_at_end"] = place["status"]
        mem = self.out["operator_memory"]
        mem["rss_when_all_shards_bound_mib"] = (self.sampler.rss("operator", place["t_bound"])
                                                if place["t_bound"] else None)
        mem["rss_peak_during_job_place_mib"] = self.sampler.rss_max("operator", place["t0"], t_end_place)
        mem["rss_peak_whole_run_mib"] = self.sampler.rss_max("operator")
        accepted = await self.ledger(place["uid"])
        figures["useful_work"] = {
            "job": "place", "departures_simulated": len(drives), "departure_away_seconds": a.away,
            **work_figures(records, "place", accepted, rate, a.shards),
            "shards_accepted": len(accepted),
        }
        if "verify" in self.jobs:
            verify = self.jobs["verify"]
            accepted_v = await self.ledger(verify["uid"])
            trust = await self.trust(self.liars)
            wf = work_figures(records, "verify", accepted_v, rate, a.shards)
            figures["verification"] = {
                "job": "verify", "spot_check_rate": a.spot_check, "seeded_valid_streak": a.trust_streak,
                "shards_accepted": len(accepted_v),
                "verification_overhead": wf["verification_overhead"],
                "primary_compute_items": wf["primary_compute_items"],
                "verification_compute_items": wf["verification_compute_items"],
                "useful_work_ratio": wf["useful_work_ratio"],
                "liars": liar_figures(records, "verify", accepted_v, self.liars, trust),
                "operator_counters": {k: round(prom_sum(verify["m1"]["operator"], k)
                                               - prom_sum(verify["m0"]["operator"], k))
                                      for k in ("fleetlet_operator_audit_replicas_total",
                                                "fleetlet_operator_verification_disagreements_total",
                                                "fleetlet_operator_pods_created_total")},
                "job_status_at_end": verify["status"],
                "seconds_created_to_complete": round(verify["t_end"] - verify["t0"], 1),
            }
            figures["verification_placement"] = placement_figures(pods, "verify", verify["t0"], a.shards)
        if "replace" in self.jobs:
            rp = self.jobs["replace"]
            figures["placement_scheduler_qps_raised"] = {
                **placement_figures(pods, "replace", rp["t0"], a.shards),
                "where_the_time_goes": self.where_time_goes(rp),
            }
        figures["seconds_place_created_to_complete"] = round(place["t_end"] - place["t0"], 1)
        figures["process_timeline"] = self.sampler.timeline(place["t0"], step=30.0)
        figures["targets"] = self.targets(figures)
        figures["analysis"] = analysis(figures)
        return figures

    def targets(self, f: dict[str, Any]) -> list[dict[str, Any]]:
        pl, mem, uw = f["placement"], self.out["operator_memory"], f["useful_work"]
        rate = pl.get("shards_placed_per_second")
        p99 = pl["pod_created_to_running_s"].get("p99")
        rows = [
            target("5: shards placed per second (creation -> all bound)", rate, ">= 333", rate is not None and rate >= 333),
            target("5: pod create -> Running p99 (s, watcher stamps)", p99, "<= 5", p99 is not None and p99 <= 5),
            target("7: operator RSS at all cars + all shards (MiB, peak of job place)",
                   mem.get("rss_peak_during_job_place_mib"), "<= 250",
                   (mem.get("rss_peak_during_job_place_mib") or 1e9) <= 250),
            target("7: operator MiB per extra 1,000 VehicleNodes", mem.get("mib_per_extra_1000_vehiclenodes"),
                   "<= 25", (mem.get("mib_per_extra_1000_vehiclenodes") or 1e9) <= 25),
            target("6: car compute ending in accepted results (interrupted share "
                   f"{uw['shards_interrupted_share']:.0%})", uw["useful_work_ratio"], ">= 0.90",
                   uw["useful_work_ratio"] >= 0.90),
            target("6: redone work share", uw["redone_work_share"], "<= 0.05", uw["redone_work_share"] <= 0.05),
        ]
        if "verification" in f:
            v = f["verification"]
            caught = v["liars"]["caught_share"]
            rows += [
                target("6: verification overhead at steady state", v["verification_overhead"], "<= 0.10",
                       v["verification_overhead"] <= 0.10),
                target("6: share of a lying car's wrong results caught", caught, ">= 0.99",
                       caught is not None and caught >= 0.99),
            ]
        if "placement_scheduler_qps_raised" in f:
            r = f["placement_scheduler_qps_raised"].get("shards_placed_per_second")
            rows.append(target("5 (scheduler client QPS raised): shards placed per second", r, ">= 333",
                               r is not None and r >= 333))
        return rows

    async def close(self) -> None:
        for fp in self.fleet:
            if fp.process is not None and fp.process.poll() is None:
                await asyncio.to_thread(fp.stop, 30.0)
        if self.watcher is not None and self.watcher.process.is_alive():
            self.watcher.process.terminate()
        for h in (self.operator, self.shim):
            if h is not None:
                await asyncio.to_thread(h.stop)
        await self.sampler.stop()
        if self.kube is not None:
            await self.kube.close()
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args)
    try:
        figures = await bench.run()
    finally:
        await bench.close()
    return {**bench.out, **figures}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cars", type=int, default=5000)
    p.add_argument("--shards", type=int, default=10000)
    p.add_argument("--quick", action="store_true", help="500 cars, 1,000 shards, 30 s shards (a few minutes)")
    p.add_argument("--shard-size", type=int, default=100, help="items per shard")
    p.add_argument("--shard-seconds", type=float, default=60.0,
                   help="SIMULATED compute time of one shard (items/s = shard size / this)")
    p.add_argument("--scheduler-qps", type=int, default=0,
                   help="the kube-scheduler's --kube-api-qps (0: the embedded control plane's, 500)")
    p.add_argument("--checkpoint-seconds", type=float, default=30.0, help="the agent's checkpoint interval "
                   "(its default)")
    p.add_argument("--interrupt", type=float, default=0.2, help="share of shards whose car drives off mid-shard")
    p.add_argument("--away", type=float, default=60.0, help="seconds a departed car stays away")
    p.add_argument("--spot-check", type=float, default=0.05, help="the jobs' verification.spotCheckRate")
    p.add_argument("--trust-streak", type=int, default=50, help="status.trust.validStreak seeded on every car")
    p.add_argument("--liars", type=int, default=10, help="cars returning wrong results in job verify")
    p.add_argument("--vn-small", type=int, default=1000, help="VehicleNodes at the operator's first memory point")
    p.add_argument("--settle", type=float, default=15.0, help="seconds before each operator memory reading")
    p.add_argument("--fleet-settle", type=float, default=45.0,
                   help="seconds between the last car Node becoming schedulable and the first job")
    p.add_argument("--fleet-procs", type=int, default=0, help="processes the SIMULATED cars are split across "
                   "(0: 1 up to 1,500 cars, else 2)")
    p.add_argument("--progress-interval", type=float, default=5.0,
                   help="SIMULATED compute's progress events (s); the real runner's are per batch")
    p.add_argument("--status-interval", type=float, default=10.0,
                   help="the agents' progress-only status interval (s; agent default 2)")
    p.add_argument("--log-interval", type=float, default=60.0, help="the agents' progress log interval (s)")
    p.add_argument("--register-timeout", type=float, default=900.0)
    p.add_argument("--job-timeout", type=float, default=3600.0)
    p.add_argument("--skip-verify", action="store_true", help="no phase 2")
    p.add_argument("--rerun-scheduler-qps", type=int, default=0,
                   help="phase 3: restart the kube-scheduler with this --kube-api-qps and place again")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "",
                   help="py-spy binary: profile the operator and the shim while job place is placed (optional)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.quick:
        args.cars, args.shards, args.shard_seconds, args.vn_small = 500, 1000, 30.0, 100
        args.settle, args.liars, args.away = 5.0, 3, 30.0
        if args.out == RESULTS:
            args.out = HERE / "results" / "operator-quick.json"
    started = time.time()
    figures = asyncio.run(run(args))
    out = {
        "benchmark": "FleetJobs at fleet scale on SIMULATED cars: placement, create -> Running, operator memory, "
                     "useful work under departures, verification overhead and lying cars",
        "simulated": "the cars' compute (SimulatedCompute: work that takes time, checkpoints and yields "
                     "deterministic results; no model runs) and the vehicles (parked, plugged in, 90 % charged; "
                     "departures are forced drive-state flips). Real: control plane, operator, shim, car agents "
                     "and links, pods, bindings, taints, Leases.",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "note": "kube-apiserver, etcd, kube-scheduler, kube-controller-manager, "
                                         "fleetlet-operator, fleetlet-shim, every SIMULATED car and the pod "
                                         "watcher on this machine"},
        "flags": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "setup": {"cars": args.cars, "shards": args.shards, "shard_size_items": args.shard_size,
                  "simulated_items_per_second": round(args.shard_size / args.shard_seconds, 3),
                  "shard_seconds": args.shard_seconds, "checkpoint_seconds": args.checkpoint_seconds,
                  "pod_resources": {"cpu": "1", "memory": "512Mi"}, "lease_renew_seconds": 25,
                  "operator_flags": "defaults (--job-workers 4, --create-concurrency 32)",
                  "shim_flags": "defaults (pod progress every 30 s, Lease every 25 s)",
                  "agent_rates": {"status_interval_s": args.status_interval,
                                  "progress_events_s": args.progress_interval,
                                  "log_interval_s": args.log_interval}},
        "method": __doc__,
        **figures,
        "wall_seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    for row in out.get("targets", []):
        say(f"{'MET   ' if row['met'] else 'MISSED'} {row['target']}: {row['value']} (goal {row['goal']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
