"""``fleetlet upload``, ``submit``, ``status``, ``revoke`` and ``trust``: a user's day-to-day commands.

They follow kubectl's habits (``--kubeconfig``, ``-n/--namespace``, ``-o yaml|json``) and talk to the API server
through Fleetlet's lean client. The artifact store they upload to is the embedded store's directory (the local
control plane's, or ``--store``/``$FLEETLET_STORE``); an S3-compatible store is not supported by these commands
yet, and they say so rather than pretend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from fleetlet.api.v1alpha1 import FleetJob
from fleetlet.api.v1alpha1.meta import API_VERSION
from fleetlet.artifacts import BlobStore
from fleetlet.kube import ApiError, KubeClient, KubeConfig, resource_path
from fleetlet.kube.client import MERGE

FIELD_MANAGER = "fleetlet-cli"
REVOCATIONS = "fleetlet-car-revocations"


def store_dir(args: argparse.Namespace, default: Path) -> Path:
    import os

    return Path(args.store or os.environ.get("FLEETLET_STORE") or default)


def uri(digest: str) -> str:
    return f"fleetlet://sha256/{digest}"


def upload(paths: list[Path], store: Path) -> list[str]:
    if not store.is_dir():
        raise SystemExit(f"error: no artifact store at {store}: start one with `fleetlet up` (or `make demo`), or "
                         "pass --store DIR")
    blobs = BlobStore(store)
    return [blobs.put_file(p) for p in paths]


def cmd_upload(args: argparse.Namespace, default_store: Path) -> int:
    for path, digest in zip(args.files, upload(args.files, store_dir(args, default_store)), strict=True):
        print(f"{uri(digest)}\t{path}")
    return 0


def _items(path: Path, fmt: str) -> int:
    from fleetlet.arrays import load_arrays

    if fmt == "npy":
        import numpy as np

        return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
    return int(next(iter(load_arrays(path).values())).shape[0])


def job_body(args: argparse.Namespace, model: str, data: str, items: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": uri(model), "sha256": model},
        "input": {"uri": uri(data), "sha256": data, "format": args.format, "items": items},
        "shardSize": args.shard_size, "parallelism": args.parallelism,
        "resources": {"cpu": args.cpu, "memory": args.memory},
        "verification": {"replicas": args.replicas, "quorum": args.quorum},
        "placement": {"allowUnplugged": args.allow_unplugged},
        "retries": args.retries,
    }
    body = {"apiVersion": API_VERSION, "kind": "FleetJob", "metadata": {"name": args.name, "namespace": args.namespace},
            "spec": spec}
    FleetJob.model_validate(body)  # the same rules the API server's schema and CEL apply: fail here, clearly
    return body


def cmd_submit(args: argparse.Namespace, default_store: Path) -> int:
    fmt = args.format or ("npz" if args.input.suffix == ".npz" else "npy")
    args.format = fmt
    model, data = upload([args.model, args.input], store_dir(args, default_store))
    body = job_body(args, model, data, _items(args.input, fmt))
    if args.output:
        print(_render(body, args.output))
    if args.dry_run:
        return 0

    async def create() -> dict[str, Any]:
        async with KubeClient(KubeConfig.load(args.kubeconfig)) as kube:
            path = resource_path(API_VERSION, "fleetjobs", args.namespace, args.name)
            return await kube.apply(path, body, FIELD_MANAGER)

    try:
        made = asyncio.run(create())
    except ApiError as exc:
        raise SystemExit(f"error: the API server refused the FleetJob: {exc.message}") from None
    print(f"fleetjob.fleetlet.io/{made['metadata']['name']} submitted", file=sys.stderr)
    return 0


def progress_line(job: dict[str, Any]) -> str:
    st = job.get("status") or {}
    spec = job.get("spec", {})
    shards = st.get("shards") or {}
    total, done = st.get("itemsTotal") or spec.get("input", {}).get("items", 0), st.get("itemsDone", 0)
    pct = 100.0 * done / total if total else 0.0
    bar = "#" * int(pct / 5) + "." * (20 - int(pct / 5))
    phase = st.get("phase", "Pending")
    cond: dict[str, Any] = next((c for c in st.get("conditions", []) if c.get("type") == "Progressing"), {})
    why = f" — {cond.get('message')}" if phase == "Pending" and cond.get("message") else ""
    return (f"{job['metadata']['name']}: {phase:<9} [{bar}] {pct:5.1f}% {done}/{total} items  shards "
            f"{shards.get('verified', 0)}/{shards.get('total', 0)} verified, {shards.get('running', 0)} running, "
            f"{shards.get('failed', 0)} failed  {st.get('energyKWh', 0.0):.4f} kWh{why}")


def cmd_status(args: argparse.Namespace) -> int:
    async def fetch(kube: KubeClient) -> list[dict[str, Any]]:
        if args.name:
            return [await kube.get(resource_path(API_VERSION, "fleetjobs", args.namespace, args.name))]
        ns = None if args.all_namespaces else args.namespace
        return list((await kube.list(resource_path(API_VERSION, "fleetjobs", ns))).get("items", []))

    async def run() -> int:
        async with KubeClient(KubeConfig.load(args.kubeconfig)) as kube:
            while True:
                try:
                    jobs = await fetch(kube)
                except ApiError as exc:
                    raise SystemExit(f"error: {exc.message}") from None
                if args.output:
                    print(_render(jobs[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": jobs},
                                  args.output))
                    return 0
                lines = [progress_line(j) for j in jobs] or ["no FleetJobs"]
                tty = sys.stdout.isatty()
                print(("\r\x1b[K" if tty and args.watch else "") + "\n".join(lines),
                      end="" if tty and args.watch and len(lines) == 1 else "\n", flush=True)
                phases = {(j.get("status") or {}).get("phase") for j in jobs}
                if not args.watch or phases <= {"Succeeded", "Failed"}:
                    if tty and args.watch:
                        print()
                    return 0 if "Failed" not in phases else 1
                await asyncio.sleep(args.interval)

    return asyncio.run(run())


def cmd_revoke(args: argparse.Namespace) -> int:
    """Add a car (or one certificate serial) to the revocation list every shim replica reads."""
    if bool(args.car) == bool(args.serial):
        raise SystemExit("error: name a car, or give --serial (not both)")

    async def run() -> None:
        async with KubeClient(KubeConfig.load(args.kubeconfig)) as kube:
            path = resource_path("v1", "configmaps", args.namespace, REVOCATIONS)
            try:
                current = await kube.get(path)
            except ApiError as exc:
                if not exc.not_found:
                    raise
                current = {"data": {}}
            data = dict(current.get("data") or {})
            key, value = ("serials", args.serial.lower()) if args.serial else ("cars", args.car)
            lines = [ln for ln in data.get(key, "").splitlines() if ln.strip()]
            if args.undo:
                lines = [ln for ln in lines if ln.strip() != value]
            elif value not in lines:
                lines.append(value)
            data[key] = "".join(f"{ln}\n" for ln in lines)
            body = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": REVOCATIONS, "namespace": args.namespace}, "data": data}
            await kube.apply(path, body, FIELD_MANAGER)

    asyncio.run(run())
    what = f"certificate serial {args.serial}" if args.serial else f"car {args.car}"
    print(f"{what} {'restored' if args.undo else 'revoked'}: every shim replica "
          f"{'accepts' if args.undo else 'refuses'} it within seconds", file=sys.stderr)
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    """Clear a car's untrusted mark (after its owner fixed it): it gets work again, audited as a new car."""

    async def run() -> None:
        async with KubeClient(KubeConfig.load(args.kubeconfig)) as kube:
            path = resource_path(API_VERSION, "vehiclenodes", name=args.car, sub="status")
            trust = {"untrusted": False, "validStreak": 0,
                     "message": f"trust restored by an administrator at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"}
            await kube.patch(path, {"status": {"trust": trust}}, content_type=MERGE)

    try:
        asyncio.run(run())
    except ApiError as exc:
        raise SystemExit(f"error: {exc.message}") from None
    print(f"car {args.car}: trusted again (its results are audited until it builds a record)", file=sys.stderr)
    return 0


def _render(obj: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(obj, indent=2)
    return yaml.safe_dump(obj, sort_keys=False).rstrip()


def add_commands(sub: Any, default_store: Path) -> None:
    def common(p: argparse.ArgumentParser, namespaced: bool = True) -> None:
        p.add_argument("--kubeconfig", help="kubeconfig (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
        if namespaced:
            p.add_argument("-n", "--namespace", default="default")

    up = sub.add_parser("upload", help="put files into the artifact store; prints their fleetlet:// URIs")
    up.add_argument("files", nargs="+", type=Path)
    up.add_argument("--store", help=f"the store's directory (default: $FLEETLET_STORE or {default_store})")
    up.set_defaults(func=lambda a: cmd_upload(a, default_store))

    sb = sub.add_parser("submit", help="upload a model and its input and create a FleetJob for them")
    common(sb)
    sb.add_argument("name", help="the FleetJob's name")
    sb.add_argument("--model", type=Path, required=True, help="an ONNX model file")
    sb.add_argument("--input", type=Path, required=True, help="the input: .npy (one array) or .npz (named arrays)")
    sb.add_argument("--format", choices=["npy", "npz"], help="default: from the input's suffix")
    sb.add_argument("--shard-size", type=int, default=256)
    sb.add_argument("--parallelism", type=int, default=10)
    sb.add_argument("--replicas", type=int, default=1)
    sb.add_argument("--quorum", type=int, default=1)
    sb.add_argument("--retries", type=int, default=3)
    sb.add_argument("--cpu", default="1")
    sb.add_argument("--memory", default="1Gi")
    sb.add_argument("--allow-unplugged", action="store_true", help="cars running on battery may take shards")
    sb.add_argument("--store", help=f"the store's directory (default: $FLEETLET_STORE or {default_store})")
    sb.add_argument("-o", "--output", choices=["yaml", "json"], help="print the FleetJob")
    sb.add_argument("--dry-run", action="store_true", help="upload and print, do not create")
    sb.set_defaults(func=lambda a: cmd_submit(a, default_store))

    st = sub.add_parser("status", help="FleetJobs' progress (one line each); --watch until they finish")
    common(st)
    st.add_argument("name", nargs="?")
    st.add_argument("-A", "--all-namespaces", action="store_true")
    st.add_argument("-w", "--watch", action="store_true")
    st.add_argument("--interval", type=float, default=2.0)
    st.add_argument("-o", "--output", choices=["yaml", "json"])
    st.set_defaults(func=cmd_status)

    rv = sub.add_parser("revoke", help="revoke a car's credentials (or one certificate) for every shim replica")
    common(rv, namespaced=False)
    rv.add_argument("car", nargs="?", help="the car (its Node name)")
    rv.add_argument("--serial", help="revoke one certificate by its hexadecimal serial instead")
    rv.add_argument("--undo", action="store_true", help="take the revocation back")
    rv.add_argument("-n", "--namespace", default="fleetlet-system", help="the shims' namespace")
    rv.set_defaults(func=cmd_revoke)

    tr = sub.add_parser("trust", help="clear a car's untrusted mark after its results failed verification")
    common(tr, namespaced=False)
    tr.add_argument("car")
    tr.set_defaults(func=cmd_trust)

