"""``fleetlet-shim``: serve many cars as Kubernetes Nodes (one process; replicas split the fleet)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from fleetlet.artifacts import BlobStore, GrantSigner, make_app
from fleetlet.kube import KubeClient, KubeConfig

from .kubelet_api import KubeletApi
from .kubelet_api import server_ssl_context as kubelet_ssl
from .link.credentials import server_ssl_context as link_ssl
from .link.server import LinkConfig, LinkServer
from .metrics import ShimMetrics
from .shim import Shim, ShimSettings

log = logging.getLogger("fleetlet_shim")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetlet-shim", description=__doc__)
    p.add_argument("--kubeconfig", help="kubeconfig (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
    p.add_argument("--shim-id", default=os.environ.get("HOSTNAME", "shim-0"))
    p.add_argument("--replica", type=int, default=0, help="this replica's index (cars are split by hash)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--advertise-address", default="127.0.0.1", help="the Nodes' InternalIP (this shim's address)")
    p.add_argument("--link-address", default="0.0.0.0:8443", help="host:port cars dial (TLS WebSocket)")
    p.add_argument("--link-cert", required=True)
    p.add_argument("--link-key", required=True)
    p.add_argument("--car-ca", required=True, help="CA that signs the cars' client certificates")
    p.add_argument("--artifact-url", help="base URL cars fetch artifacts from (default: https://<advertise>:<link port>)")
    p.add_argument("--kubelet-port", type=int, default=10250)
    p.add_argument("--kubelet-cert", required=True, help="serving cert for the kubelet API, signed by the cluster CA")
    p.add_argument("--kubelet-key", required=True)
    p.add_argument("--kubelet-client-ca", required=True, help="CA of the API server's kubelet client certificate")
    p.add_argument("--artifact-dir", required=True, help="directory of the embedded content-addressed store")
    p.add_argument("--grant-key-file", required=True, help="file of >= 32 random bytes signing artifact grants")
    p.add_argument("--metrics-address", default="127.0.0.1:9090")
    p.add_argument("--lease-renew-seconds", type=float, default=25.0)
    p.add_argument("--link-heartbeat-seconds", type=float, default=30.0)
    p.add_argument("--link-dead-after-seconds", type=float, default=45.0)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "0.0.0.0", int(port)


async def serve(args: argparse.Namespace, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    registry = CollectorRegistry()
    metrics = ShimMetrics(registry)
    link_host, link_port = _split(args.link_address)
    settings = ShimSettings(
        shim_id=args.shim_id,
        replica=args.replica,
        replicas=args.replicas,
        advertise_address=args.advertise_address,
        kubelet_port=args.kubelet_port,
        artifact_base_url=args.artifact_url or f"https://{args.advertise_address}:{link_port}",
        lease_renew_interval_s=args.lease_renew_seconds,
    )
    signer = GrantSigner(await asyncio.to_thread(Path(args.grant_key_file).read_bytes))
    store = BlobStore(args.artifact_dir)
    # Connections: every write in flight, plus the two long-lived watches.
    async with KubeClient(KubeConfig.load(args.kubeconfig), max_connections=settings.api_concurrency + 8,
                          observer=metrics.observe_call,
                          on_retry=metrics.observe_retry) as kube:
        shim = Shim(kube, signer, metrics, settings)
        link = LinkServer(
            shim,
            link_ssl(args.car_ca, args.link_cert, args.link_key),
            config=LinkConfig(heartbeat_seconds=args.link_heartbeat_seconds,
                              dead_after_seconds=args.link_dead_after_seconds),
            registry=registry,
        )
        shim.link = link
        await shim.start()
        # One TLS listener for cars: the link and the artifact store (grants scope what each car may fetch).
        await link.start(link_host, link_port, app=make_app(store, signer))
        kubelet_app = KubeletApi(shim, kube).app()
        metrics_app = web.Application()

        async def metrics_handler(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(registry), content_type="text/plain")

        metrics_app.router.add_get("/metrics", metrics_handler)
        runners = []
        for app, host, port, ctx in (
            (kubelet_app, "0.0.0.0", args.kubelet_port, kubelet_ssl(args.kubelet_cert, args.kubelet_key,
                                                                     args.kubelet_client_ca)),
            (metrics_app, *_split(args.metrics_address), None),
        ):
            runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            await web.TCPSite(runner, host, port, ssl_context=ctx, backlog=4096).start()
            runners.append(runner)
        log.info("shim %s serving: cars on %s, kubelet API on :%d, metrics on %s", settings.shim_id,
                 args.link_address, args.kubelet_port, args.metrics_address)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            await link.stop()
            for runner in runners:
                await runner.cleanup()
            await shim.stop()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(args, stop=stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
