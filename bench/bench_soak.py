"""Soak (PERFORMANCE.md target 1): 5,000 SIMULATED cars kept Ready with renewed Leases for 60 minutes, with the
kube-apiserver, etcd, kube-scheduler, kube-controller-manager (node-monitor grace period 50 s, the default),
fleetlet-operator and fleetlet-shim on the same machine (2 cores).

The cars are real car agents (``SimFleetHarness`` in ``--fleet-procs`` child processes, bench_operator.py's
worker): own certificate, TLS link, telemetry with its deadbands, safety reflex, the owners' seeded policies
(floors, plug rules, availability windows in their own time zones, energy caps); the vehicles are SIMULATED
(parked, plugged in, 90 % charged at the start, then the battery/thermal physics runs in real time; no driving
schedules). No jobs run: this is the idle fleet's cost.

Measured, once a minute and over the whole soak:
- false NotReady: a separate watcher process follows every car Node and records each time its Ready condition
  leaves True (any reason), so a blip between two samples is not missed (target 0);
- mutating API latency: the API server's own ``apiserver_request_duration_seconds`` over every mutating request
  (every client; p99 as the upper bucket bound, target <= 1 s), and the shim's own PATCH latency;
- the shim's Lease renewal lag p99 and its API writes per car per minute; the API server's count of mutating
  requests by resource;
- CPU (cores) and RSS of every process (etcd, apiserver, scheduler, controller-manager, operator, shim, the car
  processes, the watcher), per minute.

Writes bench/results/soak.json.

    python bench/bench_soak.py                         # 5,000 cars, 60 minutes
    python bench/bench_soak.py --cars 500 --minutes 3  # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import random
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_operator import (
    CRDS,
    FleetProcess,
    Sampler,
    apiserver_metrics,
    apiserver_writes,
    component_pids,
    machine,
    mutating_p99,
    prom_quantile,
    prom_sum,
    say,
    until,
    versions,
    vn_bodies,
)
from benchlib import follow

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"


# ---- the Node watcher (its own process) --------------------------------------------------------------------------


def node_watcher_main(kubeconfig: str, conn: Any, stop: Any) -> None:
    asyncio.run(_watch_nodes(kubeconfig, conn, stop))


async def _watch_nodes(kubeconfig: str, conn: Any, stop: Any) -> None:
    from fleetlet.kube import KubeClient, KubeConfig, resource_path

    ready: dict[str, str] = {}  # node -> Ready status as last seen
    transitions: list[dict[str, Any]] = []  # Ready leaving True (or coming back), after arming

    armed = [False]

    def handle(kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            ready.pop(name, None)
            return
        cond = next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
        status = cond.get("status", "Unknown") if cond else "Unknown"
        before = ready.get(name)
        ready[name] = status
        if armed[0] and before is not None and before != status:
            transitions.append({"node": name, "at": time.monotonic(), "from": before, "to": status,
                                "reason": cond.get("reason") if cond else None,
                                "message": (cond.get("message") or "")[:200] if cond else None})

    async with KubeClient(KubeConfig.load(kubeconfig)) as kube:
        path = resource_path("v1", "nodes")
        params = {"labelSelector": "fleetlet.io/vehicle=true"}
        synced = asyncio.Event()

        task = asyncio.create_task(follow(kube, path, params, handle, synced, "node watcher"))
        await synced.wait()
        conn.send("synced")
        while not stop.is_set():
            await asyncio.sleep(1.0)
            while conn.poll():
                if conn.recv() == "arm":
                    armed[0] = True
                    conn.send("armed")
            counts = Counter(ready.values())
            conn.send({"t": time.monotonic(), "nodes": len(ready), "ready": counts.get("True", 0),
                       "not_ready_now": len(ready) - counts.get("True", 0), "transitions": len(transitions)})
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    conn.send({"final": transitions, "ready": dict(Counter(ready.values()))})


class NodeWatcher:
    def __init__(self, kubeconfig: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._stop = ctx.Event()
        self.process = ctx.Process(target=node_watcher_main, args=(str(kubeconfig), child, self._stop), daemon=True)
        self.latest: dict[str, Any] = {}

    def start(self) -> None:
        self.process.start()
        if self._conn.recv() != "synced":
            raise RuntimeError("the node watcher did not sync")

    def arm(self) -> None:
        self._conn.send("arm")
        while True:
            msg = self._conn.recv()
            if msg == "armed":
                return

    def poll(self) -> dict[str, Any]:
        while self._conn.poll():
            msg = self._conn.recv()
            if isinstance(msg, dict) and "nodes" in msg:
                self.latest = msg
        return self.latest

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        while True:
            msg = self._conn.recv()
            if isinstance(msg, dict) and "final" in msg:
                self.process.join(timeout=30)
                return msg


# ---- the soak ---------------------------------------------------------------------------------------------------


def fleet_specs(n: int, seed: int) -> list[Any]:
    from fleetlet_car.sim import make_vehicle_specs

    return list(make_vehicle_specs(n, seed))  # the owners' own policies, as seeded


def shim_writes(m0: dict[str, float], m1: dict[str, float]) -> float:
    return sum(v - m0.get(k, 0.0) for k, v in m1.items() if k.startswith("fleetlet_shim_api_calls_total{")
               and any(f'verb="{x}"' in k for x in ("POST", "PUT", "PATCH", "DELETE")))


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    from fleetlet.cli.local import FleetCredentials, apply_objects, launch_operator, launch_shim
    from fleetlet.localcluster import LocalCluster

    work = Path(tempfile.mkdtemp(prefix="fleetlet-bench-soak-"))
    say(f"work dir {work}")
    cluster = LocalCluster(state_dir=work / "cp")  # node-monitor grace 50 s: the default
    sampler = Sampler(2.0)
    fleet: list[FleetProcess] = []
    shim = operator = None
    watcher: NodeWatcher | None = None
    out: dict[str, Any] = {}
    try:
        await asyncio.to_thread(cluster.start)
        cluster.kubectl("apply", "--server-side", "-k", str(CRDS))
        cluster.kubectl("wait", "--for=condition=Established", "crd/vehiclenodes.fleetlet.io")
        for name, pid in component_pids(cluster).items():
            sampler.add(name, pid)
        sampler.start()
        out["versions"] = versions(cluster)
        specs = fleet_specs(args.cars, args.seed)
        bodies = vn_bodies(specs)
        for i in range(0, len(bodies), 500):
            await asyncio.to_thread(apply_objects, cluster, bodies[i:i + 500])
        creds = FleetCredentials.create(work / "fleet-credentials")
        store = work / "artifacts"
        shim = await asyncio.to_thread(launch_shim, cluster, work / "shim", lease_renew_s=args.renew, local=cluster,
                                       heartbeat_s=30.0, dead_after_s=45.0, credentials=creds, artifact_dir=store)
        operator = await asyncio.to_thread(launch_operator, cluster, work / "operator", artifact_dir=store,
                                           local=cluster)
        sampler.add("shim", shim.process.pid)
        sampler.add("operator", operator.process.pid)
        watcher = NodeWatcher(cluster.kubeconfig)
        await asyncio.to_thread(watcher.start)
        assert watcher.process.pid is not None
        sampler.add("node-watcher", watcher.process.pid)
        ca_crt, ca_key = creds.ca.pair.write(work / "fleet-ca", "ca")
        procs = args.fleet_procs or (1 if args.cars <= 1500 else 2)
        wire = [s.model_dump(mode="json", by_alias=True, exclude_none=True) for s in specs]
        common = {"shim_url": shim.link_url, "ca_crt": str(ca_crt), "ca_key": str(ca_key), "seed": args.seed,
                  "rate": 1.0, "progress_interval": 5.0, "checkpoint_s": 30.0, "status_s": 2.0, "log_s": 5.0,
                  "liars": [], "lie_model": "", "interrupt_model": "", "interrupt_p": 0.0, "interrupt_share": 0.0,
                  "away_s": 0.0, "expected_shards": 0}
        t_connect = time.monotonic()
        for i in range(procs):
            fp = FleetProcess(i, {**common, "specs": wire[i::procs]}, work)
            fp.start()
            assert fp.process is not None
            sampler.add(f"fleet-{i}", fp.process.pid)
            fleet.append(fp)

        def all_ready() -> bool:
            return bool(shim.metrics().get("fleetlet_shim_nodes_ready", 0) >= args.cars)

        await until(f"{args.cars} cars Ready", all_ready, args.register_timeout, 2.0)
        say(f"{args.cars} SIMULATED cars Ready {time.monotonic() - t_connect:.0f}s after their processes started; "
            f"settling {args.settle:.0f}s")
        out["fleet"] = {"processes": procs, "seconds_to_all_ready": round(time.monotonic() - t_connect, 1)}
        await asyncio.sleep(args.settle)  # registration's writes (Lease creation, first statuses) end
        await asyncio.to_thread(watcher.arm)
        t0 = time.monotonic()
        a0, s0, o0 = apiserver_metrics(cluster), shim.metrics(), operator.metrics()
        prev = (a0, s0, t0)
        minutes: list[dict[str, Any]] = []
        worst_not_ready = 0
        for minute in range(1, int(args.minutes) + 1):
            target_t = t0 + minute * 60.0
            while time.monotonic() < target_t:
                await asyncio.sleep(min(5.0, max(0.0, target_t - time.monotonic())))
                w = watcher.poll()
                worst_not_ready = max(worst_not_ready, int(w.get("not_ready_now", 0)))
            a1, s1 = await asyncio.to_thread(apiserver_metrics, cluster), await asyncio.to_thread(shim.metrics)
            t1 = time.monotonic()
            pa, ps, pt = prev
            w = watcher.poll()
            row = {
                "minute": minute,
                "nodes_ready": w.get("ready"), "not_ready_now": w.get("not_ready_now"),
                "ready_transitions_so_far": w.get("transitions"),
                "apiserver_mutating_p99_s": mutating_p99(pa, a1),
                "apiserver_writes_per_car_per_minute": round(sum(apiserver_writes(pa, a1).values()) / args.cars
                                                             / ((t1 - pt) / 60), 3),
                "shim_writes_per_car_per_minute": round(shim_writes(ps, s1) / args.cars / ((t1 - pt) / 60), 3),
                "shim_patch_p99_s": prom_quantile(s1, "fleetlet_shim_api_call_seconds", 0.99, ps, verb="PATCH"),
                "lease_lag_p99_s": prom_quantile(s1, "fleetlet_shim_lease_renewal_lag_seconds", 0.99, ps),
                "cars_connected": s1.get("fleetlet_shim_cars_connected"),
                "cpu_cores": sampler.cores(pt, t1),
                "rss_mib": {k: v[1] for k, v in sampler.samples[-1][1].items() if not k.startswith("_")},
            }
            row["rss_mib"] = {k: round(v, 1) for k, v in row["rss_mib"].items()}
            row["cpu_cores_total"] = round(sum(v for k, v in row["cpu_cores"].items() if not k.startswith("_")), 3)
            minutes.append(row)
            prev = (a1, s1, t1)
            say(f"minute {minute}/{int(args.minutes)}: {row['nodes_ready']} Ready, {row['not_ready_now']} not, "
                f"{row['ready_transitions_so_far']} Ready transitions; mutating p99 {row['apiserver_mutating_p99_s']}s; "
                f"lease lag p99 {row['lease_lag_p99_s']}s; {row['apiserver_writes_per_car_per_minute']} writes/car/min; "
                f"CPU {row['cpu_cores_total']} cores (shim {row['cpu_cores'].get('shim')}, apiserver "
                f"{row['cpu_cores'].get('kube-apiserver')}); RSS shim {row['rss_mib'].get('shim')} MiB, operator "
                f"{row['rss_mib'].get('operator')} MiB")
        t_end = time.monotonic()
        a1, s1, o1 = apiserver_metrics(cluster), shim.metrics(), operator.metrics()
        final = await asyncio.to_thread(watcher.stop)
        watcher = None
        transitions = [{**t, "at_s": round(t["at"] - t0, 1)} for t in final["final"]]
        for t in transitions:
            t.pop("at", None)
        went_down = [t for t in transitions if t["from"] == "True"]
        total_min = (t_end - t0) / 60
        writes = apiserver_writes(a0, a1)
        out["soak"] = {
            "minutes": round(total_min, 2),
            "cars": args.cars,
            "false_not_ready": len({t["node"] for t in went_down}),
            "ready_transitions": transitions[:50],
            "not_ready_at_any_sample_max": worst_not_ready,
            "nodes_ready_at_end": final["ready"],
            "apiserver_mutating_p99_s": mutating_p99(a0, a1),
            "apiserver_mutating_p50_s": mutating_p99(a0, a1, 0.5),
            "apiserver_mutating_requests_per_second": round(sum(writes.values()) / (t_end - t0), 1),
            "apiserver_writes_per_car_per_minute": round(sum(writes.values()) / args.cars / total_min, 3),
            "apiserver_writes_by_resource_per_minute": {k: round(v / total_min, 1) for k, v in writes.items()},
            "shim_writes_per_car_per_minute": round(shim_writes(s0, s1) / args.cars / total_min, 3),
            "shim_patch_p99_s": prom_quantile(s1, "fleetlet_shim_api_call_seconds", 0.99, s0, verb="PATCH"),
            "lease_renewals": round(prom_sum(s1, "fleetlet_shim_lease_renewals_total")
                                    - prom_sum(s0, "fleetlet_shim_lease_renewals_total")),
            "lease_lag_p99_s": prom_quantile(s1, "fleetlet_shim_lease_renewal_lag_seconds", 0.99, s0),
            "lease_lag_max_bucket_s": prom_quantile(s1, "fleetlet_shim_lease_renewal_lag_seconds", 1.0, s0),
            "operator_api_calls": round(prom_sum(o1, "fleetlet_operator_api_calls_total")
                                        - prom_sum(o0, "fleetlet_operator_api_calls_total")),
            "cpu_cores_mean": sampler.cores(t0, t_end),
            "rss_mib_max": {name: sampler.rss_max(name, t0, t_end) for name in sampler.pids},
            "note": "_machine: every process on the machine (this benchmark's and any other)",
            "per_minute": minutes,
        }
        out["soak"]["cpu_cores_mean_total"] = round(sum(v for k, v in out["soak"]["cpu_cores_mean"].items()
                                                        if not k.startswith("_")), 3)
        s = out["soak"]
        s["targets"] = [
            {"target": "1: false NotReady over the soak", "value": s["false_not_ready"], "goal": "0",
             "met": s["false_not_ready"] == 0},
            {"target": "1: mutating API p99 (API server, all clients; s)", "value": s["apiserver_mutating_p99_s"],
             "goal": "<= 1", "met": s["apiserver_mutating_p99_s"] is not None and s["apiserver_mutating_p99_s"] <= 1},
            {"target": "1: soak length (minutes)", "value": s["minutes"], "goal": ">= 60", "met": s["minutes"] >= 60},
        ]
    finally:
        if watcher is not None and watcher.process.is_alive():
            watcher.process.terminate()
        for fp in fleet:
            await asyncio.to_thread(fp.stop, 120.0)
        for h in (operator, shim):
            if h is not None:
                await asyncio.to_thread(h.stop)
        await sampler.stop()
        await asyncio.to_thread(cluster.stop)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cars", type=int, default=5000)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--renew", type=float, default=25.0, help="the shim's Lease renewal interval (its default)")
    p.add_argument("--settle", type=float, default=120.0, help="seconds after all Ready before the soak starts")
    p.add_argument("--fleet-procs", type=int, default=0, help="car processes (0: 1 up to 1,500 cars, else 2)")
    p.add_argument("--register-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    random.seed(args.seed)
    started = time.time()
    figures = asyncio.run(soak(args))
    out = {
        "benchmark": "soak: SIMULATED cars kept Ready with renewed Leases beside the whole control plane",
        "simulated": "the vehicles (parked, physics in real time, no driving); the car agents, links, shim, "
                     "operator and control plane are real",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "note": "kube-apiserver, etcd, kube-scheduler, kube-controller-manager, "
                                         "fleetlet-operator, fleetlet-shim, every SIMULATED car and the Node "
                                         "watcher on this machine"},
        "flags": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "setup": {"node_monitor_grace_period_seconds": 50, "lease_duration_seconds": 40,
                  "lease_renew_seconds": args.renew, "shim_flags": "defaults", "operator_flags": "defaults"},
        "method": __doc__,
        **figures,
        "wall_seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    for row in out.get("soak", {}).get("targets", []):
        say(f"{'MET   ' if row['met'] else 'MISSED'} {row['target']}: {row['value']} (goal {row['goal']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
