"""What the benchmarks share: /proc readings, Prometheus histogram quantiles, and a plain list-then-watch loop for
the watcher processes that stamp when objects change (kept minimal on purpose: a watcher measures the system, so
it must not bring the toolkit under test into the measurement)."""

from __future__ import annotations

import asyncio
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetlet.kube import ApiError, KubeClient


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def prom_labels(key: str) -> dict[str, str]:
    """The labels of one Prometheus sample (``name{a="x",b="y"} 1`` or its key): ``{"a": "x", "b": "y"}``."""
    if "{" not in key:
        return {}
    inner = key.split("{", 1)[1].rsplit("}", 1)[0]
    out = {}
    for part in inner.split('",'):
        k, _, v = part.partition('="')
        out[k.strip()] = v.rstrip('"')
    return out


def histogram_quantile(metrics: dict[str, float], name: str, q: float, labels: str = "",
                       since: dict[str, float] | None = None) -> float | None:
    """Upper bucket bound holding quantile ``q``; with ``since``, of the observations after that scrape only."""
    buckets = []
    for key, value in metrics.items():
        if key.startswith(name + "_bucket{") and labels in key:
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value - (since or {}).get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    return next((le for le, count in buckets if count >= q * buckets[-1][1]), None)


async def follow(kube: KubeClient, path: str, params: dict[str, str], handle: Callable[[str, dict[str, Any]], None],
                 synced: asyncio.Event, what: str = "watcher") -> None:
    """List ``path``, hand every object to ``handle("ADDED", obj)``, set ``synced``, then watch from the list's
    resourceVersion, handing on every event but bookmarks; relist after a 410, resume after a transport error."""
    while True:
        listed = await kube.list(path, **params)
        for obj in listed["items"]:
            handle("ADDED", obj)
        synced.set()
        rv = listed["metadata"]["resourceVersion"]
        try:
            while True:
                async for ev in kube.watch(path, rv, **params):
                    rv = ev.object["metadata"]["resourceVersion"]
                    if ev.type != "BOOKMARK":
                        handle(ev.type, ev.object)
        except ApiError:
            continue  # 410: relist
        except Exception as exc:  # noqa: BLE001 - a transport hiccup: resume
            print(f"{what}: {exc!r}", file=sys.stderr, flush=True)
            await asyncio.sleep(0.5)
