"""How many simulated cars one fleetlet-shim process keeps Ready with on-time Lease renewals, on this machine,
with the real kube-apiserver, etcd, scheduler and controller-manager beside it (all on the same cores).

For each fleet size (ascending, one shim, cars added on top): connect the cars (real TLS WebSocket links, real
per-car certificates), time until every Node is Ready, then soak while measuring: Nodes that fell NotReady
(false NotReady), Lease renewal lag, API writes per car per minute, mutating API latency, the shim's CPU and
memory, and the link's bytes per idle car. Figures go to bench/results/shim.json, with a "previous" block comparing
each step with the committed file (``git show HEAD:bench/results/shim.json``).

Memory breakdown (``--memory-breakdown``, on by default; ``--memory-only`` runs just it and merges it into the
results file under ``memory_breakdown.<--memory-label>``): where the shim's memory per connected car goes.
1. the whole shim at ``--memory-cars`` cars, started with tracemalloc (``PYTHONTRACEMALLOC``) and the bench-only
   hook ``bench/memhook/sitecustomize.py`` on its PYTHONPATH (SIGUSR2 dumps a snapshot and glibc's malloc
   statistics; the shim itself has no such endpoint): Python allocations per car by file, by line and by the
   innermost Fleetlet frame that caused them, RSS per car, and glibc-malloc bytes that tracemalloc cannot see
   (OpenSSL's, mostly);
2. the car link alone (``LinkServer`` with a no-op handler, in a child process) with the same number of cars over
   plain WebSockets and over TLS (with 32 and 16 KiB read buffers): RSS per car of TLS itself;
3. the informer projections the shim keeps per car (deep size of one VehicleNode's and one Node's projection).

    python bench/bench_shim.py --cars 1000,2500,5000 --soak 120
    python bench/bench_shim.py --memory-only --memory-label before
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchlib import histogram_quantile, proc_cpu_seconds, proc_rss_mib
from fleetlet_car.link import CarLink, CarLinkConfig, car_ssl_context

from fleetlet.carlink.protocol import Capacity
from fleetlet.cli.local import apply_objects, start_shim, vehiclenodes
from fleetlet.localcluster import LocalCluster

RESULTS = Path(__file__).resolve().parent / "results" / "shim.json"
CRDS = Path(__file__).resolve().parent.parent / "crds"


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


# ---- the comparison with the committed results ------------------------------------------------------------------


def previous_results() -> dict[str, Any] | None:
    """The committed bench/results/shim.json (the figures before this run), if git has it."""
    try:
        out = subprocess.run(["git", "show", "HEAD:bench/results/shim.json"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    try:
        return dict(json.loads(out.stdout))
    except ValueError:
        return None


COMPARED = ("registration_cars_per_second", "false_not_ready_max", "lease_renewal_lag_p99_seconds",
            "api_writes_per_car_per_minute", "api_writes_per_node_per_minute_apiserver_count",
            "mutating_api_p99_seconds", "shim_cpu_cores_per_1000_cars", "shim_rss_mib_per_1000_cars")


def compare_previous(result: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any] | None:
    if previous is None:
        return None
    before = {s["cars"]: s for s in previous.get("steps", []) if "failed" not in s}
    rows = []
    for step in result.get("steps", []):
        old = before.get(step.get("cars"))
        if old is None or "failed" in step:
            continue
        row: dict[str, Any] = {"cars": step["cars"]}
        for key in COMPARED:
            a, b = old.get(key), step.get(key)
            row[key] = {"previous": a, "now": b}
            if isinstance(a, int | float) and isinstance(b, int | float) and a:
                row[key]["change"] = f"{(b - a) / a:+.0%}"
        rows.append(row)
    return {"source": "git show HEAD:bench/results/shim.json (the shim before it was rewritten as controllers)",
            "steps": rows}


# ---- memory breakdown (task: where the shim's memory per car goes) ------------------------------------------------

MEMHOOK = Path(__file__).resolve().parent / "memhook"
OURS = ("/fleetlet/", "/fleetlet_shim/", "/fleetlet_car/", "/fleetlet_operator/")


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/node-shim/", "/work/main/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _category(filename: str) -> str:
    f = filename
    if "/fleetlet_shim/" in f:
        return "fleetlet_shim/" + f.split("/fleetlet_shim/", 1)[1]
    if "/fleetlet/" in f:
        return "fleetlet/" + f.split("/fleetlet/", 1)[1]
    if "asyncio/sslproto" in f or f.endswith("/ssl.py"):
        return "asyncio TLS (sslproto, ssl)"
    if "/aiohttp/" in f:
        return "aiohttp/" + f.split("/aiohttp/", 1)[1]
    if "/asyncio/" in f:
        return "asyncio/" + f.split("/asyncio/", 1)[1]
    if "/pydantic" in f:
        return "pydantic"
    if "/json/" in f:
        return "json"
    return _short(f)


def breakdown(snap0: tracemalloc.Snapshot, snap1: tracemalloc.Snapshot, cars: int, top: int = 25
              ) -> dict[str, Any]:
    """Python allocations added between two snapshots, in KiB per car."""
    def rows(diffs: list[tracemalloc.StatisticDiff], label: Any) -> list[dict[str, Any]]:
        out = []
        for d in diffs[:top]:
            if d.size_diff <= 0:
                continue
            out.append({"where": label(d), "kib_per_car": round(d.size_diff / 1024 / cars, 2),
                        "blocks_per_car": round(d.count_diff / cars, 1)})
        return out

    by_file = snap1.compare_to(snap0, "filename")
    by_line = snap1.compare_to(snap0, "lineno")
    total = sum(d.size_diff for d in by_file)
    grouped: dict[str, float] = defaultdict(float)
    for d in by_file:
        grouped[_category(d.traceback[0].filename)] += d.size_diff
    # Attribute every new block to the innermost frame of Fleetlet's own code that led to it (who asked).
    culprit: dict[str, float] = defaultdict(float)
    for d in snap1.compare_to(snap0, "traceback"):
        frames = list(d.traceback)  # oldest .. most recent
        ours = next((f for f in reversed(frames) if any(m in f.filename for m in OURS)), None)
        where = f"{_short(ours.filename)}:{ours.lineno}" if ours else f"(no Fleetlet frame) {_short(frames[-1].filename)}"
        culprit[where] += d.size_diff
    top_groups = sorted(grouped.items(), key=lambda kv: -kv[1])
    top_culprits = sorted(culprit.items(), key=lambda kv: -kv[1])[:top]
    return {
        "python_traced_kib_per_car": round(total / 1024 / cars, 2),
        "by_component": [{"where": k, "kib_per_car": round(v / 1024 / cars, 2)} for k, v in top_groups[:top] if v > 0],
        "by_fleetlet_caller": [{"where": k, "kib_per_car": round(v / 1024 / cars, 2)} for k, v in top_culprits if v > 0],
        "by_file": rows(by_file, lambda d: _short(d.traceback[0].filename)),
        "by_line": rows(by_line, lambda d: f"{_short(d.traceback[0].filename)}:{d.traceback[0].lineno}"),
    }


def deep_size(obj: Any, seen: set[int] | None = None) -> int:
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, list | tuple | set | frozenset):
        size += sum(deep_size(v, seen) for v in obj)
    return size


async def _dump(pid: int, prefix: Path, n: int) -> dict[str, Any]:
    os.kill(pid, signal.SIGUSR2)
    info = f"{prefix}.{n}.json"  # written after the snapshot: once it exists, both are complete
    for _ in range(1200):
        await asyncio.sleep(0.25)
        if await asyncio.to_thread(os.path.exists, info):
            await asyncio.sleep(0.2)
            return dict(json.loads(await asyncio.to_thread(Path(info).read_text)))
    raise RuntimeError("the shim did not answer the memory dump")


async def connect_cars(shim: Any, bodies: list[dict[str, Any]], rate: float) -> list[CarLink]:
    links = []
    for body in bodies:
        name = body["metadata"]["name"]
        crt, key = shim.car_cert(name)
        hw = body["spec"]["hardware"]
        links.append(CarLink(shim.link_url, name, car_ssl_context(shim.fleet_ca_file, crt, key),
                             agent_version="bench/1", runtimes=["onnx"], config=CarLinkConfig(),
                             capacity=Capacity(cpu=hw["cpu"], memory=hw["memory"])))
    for i, link in enumerate(links):
        link.start()
        if i % 50 == 49:
            await asyncio.sleep(50 / rate)
    return links


async def memory_breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """Part 1 (the whole shim under tracemalloc) and part 3 (projection sizes); part 2 is ``link_memory``."""
    cars = args.memory_cars
    work = Path(tempfile.mkdtemp(prefix="fleetlet-bench-shim-mem-"))
    cluster = LocalCluster(state_dir=work / "cp")
    cluster.start()
    cluster.kubectl("apply", "--server-side", "-k", str(CRDS))
    cluster.kubectl("wait", "--for=condition=Established", "crd/vehiclenodes.fleetlet.io")
    prefix = work / "memdump"
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONTRACEMALLOC", "FLEETLET_BENCH_MEMDUMP")}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(MEMHOOK), *filter(None, [saved["PYTHONPATH"]])])
    os.environ["PYTHONTRACEMALLOC"] = str(args.tracemalloc_frames)
    os.environ["FLEETLET_BENCH_MEMDUMP"] = str(prefix)
    try:
        gen = start_shim(cluster, work / "shim", lease_renew_s=args.renew, local=cluster, heartbeat_s=30.0,
                         dead_after_s=45.0)
        shim = next(gen)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    pid = shim.process.pid
    links: list[CarLink] = []
    try:
        await asyncio.sleep(5)
        info0 = await _dump(pid, prefix, 0)
        bodies = vehiclenodes(cars, seed=args.seed, prefix="mem")
        for i in range(0, len(bodies), 500):
            apply_objects(cluster, bodies[i:i + 500])
        print(f"[memory] connecting {cars} cars to a shim under tracemalloc ({args.tracemalloc_frames} frames)",
              file=sys.stderr, flush=True)
        links = await connect_cars(shim, bodies, args.connect_rate)
        t0 = time.monotonic()
        # Off the loop: the cars' links run on it, and a shim under tracemalloc answers slowly.
        while (await asyncio.to_thread(shim.metrics)).get("fleetlet_shim_nodes_ready", 0) < cars:
            if time.monotonic() - t0 > args.register_timeout:
                raise RuntimeError("not every car became Ready under tracemalloc")
            await asyncio.sleep(1.0)
        await asyncio.sleep(args.renew + args.memory_settle)  # every car's Lease renewed at least once
        info1 = await _dump(pid, prefix, 1)
        # Part 3: the projections the shim keeps of one car's VehicleNode and Node.
        from fleetlet_shim.kube import project_node, project_vehiclenode

        vn = json.loads(cluster.kubectl("get", "vn", bodies[0]["metadata"]["name"], "-o", "json").stdout)
        node = json.loads(cluster.kubectl("get", "node", bodies[0]["metadata"]["name"], "-o", "json").stdout)
    finally:
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
        gen.close()
        cluster.stop()
    snap0 = tracemalloc.Snapshot.load(f"{prefix}.0.snap")
    snap1 = tracemalloc.Snapshot.load(f"{prefix}.1.snap")
    traced = breakdown(snap0, snap1, cars)
    m0, m1 = info0["mallinfo2"], info1["mallinfo2"]
    # glibc malloc bytes in use (heap + mmapped chunks); Python's blocks over 512 bytes are among them, and
    # traced: what is left is C allocations tracemalloc cannot see (OpenSSL's above all).
    big0 = sum(t.size for t in snap0.traces if t.size > 512)
    big1 = sum(t.size for t in snap1.traces if t.size > 512)
    malloc_in_use = (m1["uordblks"] + m1["hblkhd"]) - (m0["uordblks"] + m0["hblkhd"])
    return {
        "cars": cars,
        "method": "one shim under tracemalloc (bench/memhook/sitecustomize.py on its PYTHONPATH, nothing in the "
                  "shim); snapshots after start-up (no VehicleNodes) and with every car connected, Ready and its "
                  f"Lease renewed ({args.renew + args.memory_settle:.0f} s after all Ready), each after gc.collect()",
        "rss_kib_per_car_under_tracemalloc": round((info1["rss_kib"] - info0["rss_kib"]) / cars, 1),
        "tracemalloc_own_overhead_kib_per_car": round((info1["tracemalloc_overhead_bytes"]
                                                       - info0["tracemalloc_overhead_bytes"]) / 1024 / cars, 1),
        "glibc_malloc_in_use_kib_per_car": round(malloc_in_use / 1024 / cars, 2),
        "glibc_malloc_not_python_kib_per_car": round((malloc_in_use - (big1 - big0)) / 1024 / cars, 2),
        **traced,
        "projections_bytes_per_car": {
            "vehiclenode_full": deep_size(vn), "vehiclenode_projection": deep_size(project_vehiclenode(vn)),
            "node_full": deep_size(node), "node_projection": deep_size(project_node(node)),
        },
    }


class _NullHandler:
    async def car_connected(self, car: str, hello: Any) -> None:
        pass

    async def car_message(self, car: str, msg: Any) -> None:
        pass

    async def car_disconnected(self, car: str, reason: str) -> None:
        pass


async def _link_child(pki: Path, tls: bool, buffer: int, tickets: int | None) -> None:
    """A LinkServer with a no-op handler; over plain WebSockets the car's name comes from the URL (``?car=``)
    instead of a certificate (benchmark only: it measures what TLS itself costs per connection)."""
    import contextvars

    from fleetlet_shim.link import server as srv
    from fleetlet_shim.link.credentials import server_ssl_context

    ctx = None
    if tls:
        ctx = server_ssl_context(pki / "ca.crt", pki / "shim.crt", pki / "shim.key")
        if tickets is not None:
            ctx.num_tickets = tickets
    else:
        car: contextvars.ContextVar[str] = contextvars.ContextVar("car")
        handle = srv.LinkServer._handle

        async def plain_handle(self: Any, request: Any) -> Any:
            car.set(request.query.get("car", "?"))
            return await handle(self, request)

        srv.LinkServer._handle = plain_handle  # type: ignore[method-assign]
        srv.identity_from_peercert = lambda peercert: srv.CarIdentity(car.get(), 0)  # type: ignore[assignment]
    server = srv.LinkServer(_NullHandler(), ctx, config=srv.LinkConfig(tls_read_buffer_bytes=buffer if tls else 0))  # type: ignore[arg-type]
    port = await server.start("127.0.0.1", 0)
    print(port, flush=True)
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    await server.stop()


async def link_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: RSS per connected car of the link server alone, plain vs TLS (and its read buffer)."""
    from fleetlet.pki import CAR_ORGANIZATION, CertificateAuthority

    cars = args.memory_cars
    variants = [("plain WebSocket", False, 0, None), ("TLS, 32 KiB read buffer", True, 32 * 1024, None),
                ("TLS, 16 KiB read buffer", True, 16 * 1024, None),
                ("TLS, 16 KiB read buffer, no session tickets", True, 16 * 1024, 0)]
    out: dict[str, Any] = {"cars": cars, "variants": []}
    with tempfile.TemporaryDirectory(prefix="fleetlet-bench-link-mem-") as tmp:
        pki = Path(tmp)
        ca = CertificateAuthority.create("bench-fleet-ca")
        ca.pair.write(pki, "ca")
        ca.issue("shim", server=True, ip_addresses=("127.0.0.1",)).write(pki, "shim")
        names = [f"car-{i:06d}" for i in range(cars)]
        for name in names:
            ca.issue(name, organizations=(CAR_ORGANIZATION,), client=True).write(pki, name)
        for label, tls, buffer, tickets in variants:
            child = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--link-child", str(pki), "1" if tls else "0", str(buffer),
                "-" if tickets is None else str(tickets), stdout=subprocess.PIPE)
            links: list[CarLink] = []
            try:
                assert child.stdout is not None
                port = int(await asyncio.wait_for(child.stdout.readline(), 60))
                await asyncio.sleep(1)
                rss0 = proc_rss_mib(child.pid)
                scheme = "wss" if tls else "ws"
                for i, name in enumerate(names):
                    link = CarLink(f"{scheme}://127.0.0.1:{port}/v1/link?car={name}", name,
                                   car_ssl_context(pki / "ca.crt", pki / f"{name}.crt", pki / f"{name}.key"),
                                   agent_version="bench/1", runtimes=["onnx"], config=CarLinkConfig(),
                                   capacity=Capacity(cpu="4", memory="8Gi"))
                    link.start()
                    links.append(link)
                    if i % 50 == 49:
                        await asyncio.sleep(50 / args.connect_rate)
                async with asyncio.timeout(180):
                    await asyncio.gather(*(link.connected.wait() for link in links))
                await asyncio.sleep(10)
                rss1 = proc_rss_mib(child.pid)
            finally:
                await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
                child.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(child.wait(), 30)
                if child.returncode is None:
                    child.kill()
            row = {"variant": label, "rss_kib_per_car": round((rss1 - rss0) * 1024 / cars, 1),
                   "rss_mib": round(rss1, 1)}
            print(f"[memory] link server alone, {label}: {row['rss_kib_per_car']} KiB per car", file=sys.stderr,
                  flush=True)
            out["variants"].append(row)
    per = {v["variant"]: v["rss_kib_per_car"] for v in out["variants"]}
    out["tls_kib_per_car_32k_buffer"] = round(per["TLS, 32 KiB read buffer"] - per["plain WebSocket"], 1)
    out["tls_kib_per_car_16k_buffer"] = round(per["TLS, 16 KiB read buffer"] - per["plain WebSocket"], 1)
    out["tls_kib_per_car_16k_buffer_no_tickets"] = round(
        per["TLS, 16 KiB read buffer, no session tickets"] - per["plain WebSocket"], 1)
    return out


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--link-child":
        asyncio.run(_link_child(Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]),
                                None if sys.argv[5] == "-" else int(sys.argv[5])))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cars", default="1000,2500,5000", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--soak", type=float, default=120.0)
    p.add_argument("--renew", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--register-timeout", type=float, default=300.0)
    p.add_argument("--no-kwok", action="store_true", help="skip the kwok comparison")
    p.add_argument("--connect-rate", type=float, default=250.0, help="new car links per second")
    p.add_argument("--memory-breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure where the shim's memory per car goes (tracemalloc, plain vs TLS link)")
    p.add_argument("--memory-only", action="store_true",
                   help="only the memory breakdown, merged into the existing results file")
    p.add_argument("--memory-label", default="current", help="key of this breakdown under memory_breakdown")
    p.add_argument("--memory-cars", type=int, default=1000)
    p.add_argument("--memory-settle", type=float, default=30.0)
    p.add_argument("--tracemalloc-frames", type=int, default=12)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.memory_only:
        result = json.loads(args.out.read_text()) if args.out.exists() else {}
    else:
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
                    "rss_per_1000_shim_over_kwok": round(
                        ours["shim_rss_mib_per_1000_cars"] / max(theirs["kwok_rss_mib_per_1000_nodes"], 1e-6), 2),
                })
            result["ratios"] = ratios
        result["previous"] = compare_previous(result, previous_results())
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        if "memory_breakdown" in old:
            result["memory_breakdown"] = old["memory_breakdown"]
    if args.memory_breakdown or args.memory_only:
        mem = asyncio.run(memory_breakdown(args))
        mem["link_alone"] = asyncio.run(link_memory(args))
        result.setdefault("memory_breakdown", {})[args.memory_label] = mem
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
