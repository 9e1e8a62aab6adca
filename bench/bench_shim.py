"""How many simulated cars one fleetlet-shim process keeps Ready with on-time Lease renewals, on this machine,
with the real kube-apiserver, etcd, scheduler and controller-manager beside it (all on the same cores).

For each fleet size (ascending, one shim, cars added on top): connect the cars (real TLS WebSocket links, real
per-car certificates), time until every Node is Ready, then soak while measuring: Nodes that fell NotReady
(false NotReady), Lease renewal lag, API writes per car per minute, mutating API latency, the shim's CPU and
memory, and the link's bytes per idle car. Figures go to bench/results/shim.json.

    python bench/bench_shim.py --cars 1000,2500 --soak 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fleetlet_car.link import CarLink, CarLinkConfig, car_ssl_context

from fleetlet.carlink.protocol import Capacity
from fleetlet.cli.local import apply_objects, start_shim, vehiclenodes
from fleetlet.localcluster import LocalCluster

RESULTS = Path(__file__).resolve().parent / "results" / "shim.json"
CRDS = Path(__file__).resolve().parent.parent / "crds"


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def histogram_quantile(metrics: dict[str, float], name: str, q: float, labels: str = "",
                       since: dict[str, float] | None = None) -> float | None:
    """Upper bucket bound holding quantile ``q``; with ``since``, of the observations after that scrape only."""
    buckets = []
    for key, value in metrics.items():
        if key.startswith(name + "_bucket{") and labels in key:
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value - (since or {}).get(key, 0.0)))
    if not buckets:
        return None
    buckets.sort()
    total = buckets[-1][1]
    if total == 0:
        return None
    for le, count in buckets:
        if count >= q * total:
            return le
    return None


def writes(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items()
               if k.startswith("fleetlet_shim_api_calls_total{") and any(f'verb="{m}"' in k for m in ("PATCH", "POST", "PUT", "DELETE")))


def write_calls(m0: dict[str, float], m1: dict[str, float]) -> dict[str, float]:
    """Mutating API calls during the window, by verb/resource/code."""
    out = {}
    for key, value in m1.items():
        if key.startswith("fleetlet_shim_api_calls_total{") and any(f'verb="{v}"' in key for v in ("PATCH", "POST", "PUT", "DELETE")):
            delta = value - m0.get(key, 0.0)
            if delta:
                out[key.split("{", 1)[1].rstrip("}")] = delta
    return out


def not_ready(cluster: LocalCluster, prefix: str, selector: str = "fleetlet.io/vehicle=true") -> tuple[int, int]:
    out = cluster.kubectl("get", "nodes", "-l", selector, "-o",
                          "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}")
    total = bad = 0
    for line in out.stdout.splitlines():
        name, _, status = line.partition(" ")
        if name.startswith(prefix):
            total += 1
            bad += status != "True"
    return total, bad


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fleetlet-bench-shim-"))
    cluster = LocalCluster(state_dir=work / "cp")  # default node-monitor grace period (50 s), as in production
    cluster.start()
    cluster.kubectl("apply", "--server-side", "-k", str(CRDS))
    cluster.kubectl("wait", "--for=condition=Established", "crd/vehiclenodes.fleetlet.io")
    gen = start_shim(cluster, work / "shim", lease_renew_s=args.renew, local=cluster,
                     heartbeat_s=30.0, dead_after_s=45.0)
    shim = next(gen)
    pid = shim.process.pid
    baseline_rss = proc_rss_mib(pid)
    links: list[CarLink] = []
    steps = []
    link_cfg = CarLinkConfig()
    try:
        for target in args.cars:
            add = target - len(links)
            bodies = vehiclenodes(target, seed=args.seed, prefix="bench")[len(links):]
            for i in range(0, len(bodies), 500):
                apply_objects(cluster, bodies[i:i + 500])
            new = []
            for body in bodies:
                name = body["metadata"]["name"]
                crt, key = shim.car_cert(name)
                hw = body["spec"]["hardware"]
                new.append(CarLink(shim.link_url, name, car_ssl_context(shim.fleet_ca_file, crt, key),
                                   agent_version="bench/1", runtimes=["onnx"], config=link_cfg,
                                   capacity=Capacity(cpu=hw["cpu"], memory=hw["memory"])))
            print(f"[{target} cars] connecting {add} more", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            # Cars come online at a bounded rate (as after an outage, with their backoff jitter), not all in one tick.
            for i, link in enumerate(new):
                link.start()
                if i % 50 == 49:
                    await asyncio.sleep(50 / args.connect_rate)
            links.extend(new)
            while True:
                m = shim.metrics()
                ready = m.get("fleetlet_shim_nodes_ready", 0)
                if ready >= target:
                    break
                if time.monotonic() - t0 > args.register_timeout:
                    break
                await asyncio.sleep(0.5)
            if ready < target:
                print(f"[{target} cars] only {ready:.0f} Ready after {args.register_timeout:.0f}s: stopping here",
                      file=sys.stderr, flush=True)
                steps.append({"cars": target, "ready": ready, "failed": "not every car became Ready in time"})
                break
            registration_s = time.monotonic() - t0
            total, bad = await asyncio.to_thread(not_ready, cluster, "bench-")
            print(f"[{target} cars] all Ready in {registration_s:.1f}s ({add / registration_s:.0f} cars/s); "
                  f"settling {args.renew:.0f}s, then soaking {args.soak}s", file=sys.stderr, flush=True)
            await asyncio.sleep(args.renew)  # one renewal period: the soak sees the steady state only
            m0, cpu0, t_soak = shim.metrics(), proc_cpu_seconds(pid), time.monotonic()
            w0 = apiserver_writes(cluster)
            worst_not_ready = 0
            while time.monotonic() - t_soak < args.soak:
                await asyncio.sleep(min(15.0, args.soak / 4))
                total, bad = await asyncio.to_thread(not_ready, cluster, "bench-")
                worst_not_ready = max(worst_not_ready, bad)
            elapsed = time.monotonic() - t_soak
            m1, cpu1 = shim.metrics(), proc_cpu_seconds(pid)
            w1 = apiserver_writes(cluster)
            rss = proc_rss_mib(pid)
            step = {
                "cars": target,
                "registration_seconds": round(registration_s, 2),
                "registration_cars_per_second": round(add / registration_s, 1),
                "soak_seconds": round(elapsed, 1),
                "nodes_seen": total,
                "false_not_ready_max": worst_not_ready,
                "lease_renewal_lag_p99_seconds": histogram_quantile(m1, "fleetlet_shim_lease_renewal_lag_seconds", 0.99,
                                                                    since=m0),
                "api_writes_per_car_per_minute": round((writes(m1) - writes(m0)) / target / (elapsed / 60), 3),
                "mutating_api_p99_seconds": histogram_quantile(m1, "fleetlet_shim_api_call_seconds", 0.99, 'verb="PATCH"',
                                                               since=m0),
                "api_write_calls": write_calls(m0, m1),
                "api_writes_per_node_per_minute_apiserver_count": round((w1 - w0) / target / (elapsed / 60), 3),
                "shim_cpu_cores": round((cpu1 - cpu0) / elapsed, 3),
                "shim_cpu_cores_per_1000_cars": round((cpu1 - cpu0) / elapsed / target * 1000, 4),
                "shim_rss_mib": round(rss, 1),
                "shim_rss_mib_per_1000_cars": round((rss - baseline_rss) / target * 1000, 1),
            }
            print(json.dumps(step), file=sys.stderr, flush=True)
            steps.append(step)
    finally:
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
        gen.close()
        cluster.stop()
    return {
        "benchmark": "fleetlet-shim cars kept Ready by one process",
        "machine": f"{os.cpu_count()} cores; apiserver, etcd, scheduler, controller-manager, shim and all cars on it",
        "lease_renew_interval_seconds": args.renew,
        "node_monitor_grace_period_seconds": 50,
        "steps": steps,
        "note": "link traffic per car is measured by bench_carlink.py; latency "
                "quantiles are upper bucket bounds of the shim's histograms over the soak window; "
                "api_writes_per_car_per_minute is the shim's own count, the *_apiserver_count figures are the API "
                "server's count of node and lease writes by anyone (the same yardstick as for kwok)",
    }


KWOK_VERSION = "v0.8.0"


def kwok_binary() -> Path:
    """kwok built from the Go module proxy into the cache (like the control plane), for the comparison."""
    cache = Path(os.environ.get("FLEETLET_CACHE", Path.home() / ".cache" / "fleetlet")) / f"kwok-{KWOK_VERSION}" / "bin"
    binary = cache / "kwok"
    if not binary.exists():
        print(f"building kwok {KWOK_VERSION} from the Go module proxy", file=sys.stderr, flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOBIN": str(cache), "CGO_ENABLED": "0", "GOFLAGS": "",
               "PATH": os.environ.get("PATH", "") + ":/usr/local/go/bin"}
        subprocess.run(["go", "install", "-ldflags=-s -w", f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}"],
                       check=True, env=env)
    return binary


def fake_nodes(start: int, count: int) -> list[dict[str, Any]]:
    return [{
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": f"kwok-{i:06d}", "annotations": {"kwok.x-k8s.io/node": "fake"},
                     "labels": {"type": "kwok", "kubernetes.io/hostname": f"kwok-{i:06d}"}},
        "spec": {"taints": [{"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}]},
        "status": {"allocatable": {"cpu": "8", "memory": "16Gi", "pods": "4"},
                   "capacity": {"cpu": "8", "memory": "16Gi", "pods": "4"}},
    } for i in range(start, start + count)]


def apiserver_writes(cluster: LocalCluster) -> float:
    """Mutating requests on nodes and leases as the API server counts them (the same yardstick for both)."""
    ctx = cluster._ssl_context(client=True)
    import urllib.request

    text = urllib.request.urlopen(f"{cluster.server}/metrics", context=ctx, timeout=30).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and any(f'resource="{r}"' in line for r in ("nodes", "leases")) \
                and any(f'verb="{v}"' in line for v in ("PATCH", "PUT", "POST", "APPLY", "UPDATE", "CREATE")):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def run_kwok(args: argparse.Namespace) -> list[dict[str, Any]]:
    binary = kwok_binary()
    work = Path(tempfile.mkdtemp(prefix="fleetlet-bench-kwok-"))
    cluster = LocalCluster(state_dir=work / "cp")
    cluster.start()
    # kwok's own stage definitions (node initialisation, heartbeat with a Lease), read from its module.
    gomodcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True,  # noqa: ASYNC221
                                env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/local/go/bin"}
                                ).stdout.strip()
    stages = Path(gomodcache) / f"sigs.k8s.io/kwok@{KWOK_VERSION}" / "kustomize" / "stage" / "node"
    configs = [stages / "fast" / "node-initialize.yaml", *sorted((stages / "heartbeat-with-lease").glob("*.yaml"))]
    configs = [c for c in configs if c.name != "kustomization.yaml"]
    log = (work / "kwok.log").open("wb")  # noqa: ASYNC230 (a benchmark's setup, before anything is timed)
    proc = subprocess.Popen(  # noqa: ASYNC220
        [str(binary), f"--kubeconfig={cluster.kubeconfig}", *(f"--config={c}" for c in configs),
         "--manage-all-nodes=false",
         "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake", "--node-lease-duration-seconds=40",
         "--node-ip=127.0.0.1", "--server-address=127.0.0.1:0"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    steps = []
    made = 0
    try:
        await asyncio.sleep(2)
        baseline_rss = proc_rss_mib(proc.pid)
        for target in args.cars:
            t0 = time.monotonic()
            nodes = fake_nodes(made, target - made)
            for i in range(0, len(nodes), 500):
                apply_objects(cluster, nodes[i:i + 500])
            made = target
            while True:
                total, bad = await asyncio.to_thread(not_ready, cluster, "kwok-", "type=kwok")
                if total >= target and bad == 0:
                    break
                if time.monotonic() - t0 > args.register_timeout or proc.poll() is not None:
                    raise RuntimeError(f"kwok: {total - bad}/{target} Ready; see {work / 'kwok.log'}")
                await asyncio.sleep(1)
            registration_s = time.monotonic() - t0
            print(f"[kwok {target} nodes] all Ready in {registration_s:.1f}s; settling, then soaking {args.soak}s",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(args.renew)
            w0, cpu0, t_soak = apiserver_writes(cluster), proc_cpu_seconds(proc.pid), time.monotonic()
            worst = 0
            while time.monotonic() - t_soak < args.soak:
                await asyncio.sleep(min(15.0, args.soak / 4))
                _, bad = await asyncio.to_thread(not_ready, cluster, "kwok-", "type=kwok")
                worst = max(worst, bad)
            elapsed = time.monotonic() - t_soak
            w1, cpu1, rss = apiserver_writes(cluster), proc_cpu_seconds(proc.pid), proc_rss_mib(proc.pid)
            step = {
                "nodes": target,
                "registration_seconds_including_node_creation": round(registration_s, 2),
                "registration_nodes_per_second": round((target - (made - len(nodes))) / registration_s, 1),
                "false_not_ready_max": worst,
                "api_writes_per_node_per_minute_apiserver_count": round((w1 - w0) / target / (elapsed / 60), 3),
                "kwok_cpu_cores": round((cpu1 - cpu0) / elapsed, 3),
                "kwok_cpu_cores_per_1000_nodes": round((cpu1 - cpu0) / elapsed / target * 1000, 4),
                "kwok_rss_mib": round(rss, 1),
                "kwok_rss_mib_per_1000_nodes": round((rss - baseline_rss) / target * 1000, 1),
            }
            print(json.dumps(step), file=sys.stderr, flush=True)
            steps.append(step)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()
        cluster.stop()
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cars", default="1000,2500", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--soak", type=float, default=120.0)
    p.add_argument("--renew", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--register-timeout", type=float, default=300.0)
    p.add_argument("--no-kwok", action="store_true", help="skip the kwok comparison")
    p.add_argument("--connect-rate", type=float, default=250.0, help="new car links per second")
    args = p.parse_args()
    result = asyncio.run(run(args))
    if not args.no_kwok:
        kwok = asyncio.run(run_kwok(args))
        result["kwok"] = {"version": KWOK_VERSION, "steps": kwok}
        ratios = []
        for ours, theirs in zip([s for s in result["steps"] if "failed" not in s], kwok, strict=False):
            ratios.append({
                "cars": ours["cars"],
                "registration_rate_shim_over_kwok": round(
                    ours["registration_cars_per_second"] / theirs["registration_nodes_per_second"], 2),
                "cpu_per_1000_kwok_over_shim": round(
                    theirs["kwok_cpu_cores_per_1000_nodes"] / max(ours["shim_cpu_cores_per_1000_cars"], 1e-6), 2),
                "api_writes_per_minute_shim_over_kwok": round(
                    ours["api_writes_per_node_per_minute_apiserver_count"]
                    / max(theirs["api_writes_per_node_per_minute_apiserver_count"], 1e-6), 2),
            })
        result["ratios"] = ratios
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
