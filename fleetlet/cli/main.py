"""``fleetlet``: the user's front door (kubectl habits: ``--kubeconfig``, ``-n``, ``-o yaml|json``).

Commands that exist are real; nothing here is a placeholder. ``up``/``down`` run the local control plane,
``demo`` runs the whole product on it, ``upload``/``submit``/``status`` run jobs, ``revoke``/``trust`` manage cars.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from fleetlet import __version__

log = logging.getLogger("fleetlet")


def state_dir() -> Path:
    base = os.environ.get("FLEETLET_HOME") or os.path.join(
        os.environ.get("XDG_STATE_HOME", os.path.expanduser("~/.local/state")), "fleetlet"
    )
    return Path(base) / "local"


def _repo_file(*parts: str) -> Path:
    return Path(__file__).resolve().parents[2].joinpath(*parts)


def _progress(msg: str) -> None:
    print(f"• {msg}", file=sys.stderr, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    from fleetlet.localcluster import LocalCluster

    directory = state_dir()
    if (directory / "pids.json").exists():
        _progress(f"a local control plane is already running (kubeconfig {directory / 'admin.kubeconfig'})")
        print(directory / "admin.kubeconfig")
        return 0
    _progress("finding or building the control plane binaries (a cold build takes several minutes)")
    started = time.monotonic()
    cluster = LocalCluster(state_dir=directory, detach=True)
    _progress("starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler on 127.0.0.1")
    cluster.start()
    _progress(f"control plane ready in {time.monotonic() - started:.1f}s at {cluster.server}")
    _progress("installing the Fleetlet CRDs")
    cluster.kubectl("apply", "--server-side", "-k", str(_repo_file("crds")))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/vehiclenodes.fleetlet.io", "crd/fleetjobs.fleetlet.io",
    )
    _progress(f"export KUBECONFIG={cluster.kubeconfig}")
    print(cluster.kubeconfig)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from fleetlet.cli.demo import stop_processes
    from fleetlet.localcluster import LocalCluster

    directory = state_dir()
    for name in stop_processes(directory):
        _progress(f"{name} stopped")
    if LocalCluster.stop_detached(directory):
        _progress("local control plane stopped")
    else:
        _progress("no local control plane was running")
    if args.purge:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
        _progress(f"removed {directory}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fleetlet.cli.demo import run_demo
    from fleetlet.localcluster import LocalCluster

    if cmd_up(args) != 0:
        return 1
    cluster = LocalCluster.attach(state_dir())
    return run_demo(cluster, state_dir(), cars=args.cars, seed=args.seed, departures=args.departures)


def cmd_version(args: argparse.Namespace) -> int:
    print(f"fleetlet {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetlet", description="Batch AI inference on parked electric cars.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start a local control plane (etcd + kube-apiserver + scheduler + controller-manager) "
                   "and install the CRDs").set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop the local control plane")
    down.add_argument("--purge", action="store_true", help="also delete its state (etcd data, certificates)")
    down.set_defaults(func=cmd_down)
    demo = sub.add_parser("demo", help="local control plane, operator, shim and a simulated fleet; the example "
                          "FleetJob runs to a verified result")
    demo.add_argument("--cars", type=int, default=12, help="simulated cars (default 12)")
    demo.add_argument("--seed", type=int, default=42, help="seed of the simulated fleet")
    demo.add_argument("--departures", type=int, default=3, help="cars that drive off mid-shard (default 3)")
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("version", help="print the version").set_defaults(func=cmd_version)
    from fleetlet.cli.jobs import add_commands

    add_commands(sub, state_dir() / "shim" / "artifacts")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI's last line of defence: one clear line, not a traceback
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
