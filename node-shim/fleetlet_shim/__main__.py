"""``fleetlet-shim``: serve many cars as Kubernetes Nodes (one process; replicas split the fleet).

Every listener binds to the address given for it (no implicit 0.0.0.0): the car link (``--link-address``, with
the artifact store on the same TLS listener), the kubelet API the API server dials for ``kubectl logs``
(``--kubelet-address``) and the metrics endpoint with unauthenticated ``/healthz`` and ``/readyz``
(``--metrics-address``).
"""

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

from fleetlet.artifacts import BlobStore, GrantSigner, make_app
from fleetlet.kube import KubeClient, KubeConfig
from fleetlet.kube.health import health_app

from .app import Shim
from .kubelet_api import KubeletApi
from .kubelet_api import server_ssl_context as kubelet_ssl
from .link.credentials import server_ssl_context as link_ssl
from .link.server import LinkConfig
from .metrics import ShimMetrics
from .settings import ShimSettings

log = logging.getLogger("fleetlet_shim")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetlet-shim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", help="kubeconfig (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
    p.add_argument("--shim-id", default=os.environ.get("HOSTNAME", "shim-0"))
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "fleetlet-system"),
                   help="namespace of the shim's own objects (the car revocation list ConfigMap)")
    p.add_argument("--replica", type=int, default=0, help="this replica's index (cars are split by hash)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--replica-urls", default="",
                   help="comma-separated car-link URLs of all replicas, index = replica: a car that dials the "
                        "wrong replica is redirected to its own")
    p.add_argument("--advertise-address", default="127.0.0.1", help="the Nodes' InternalIP (this shim's address)")
    p.add_argument("--link-address", default="127.0.0.1:8443", help="host:port cars dial (TLS WebSocket)")
    p.add_argument("--link-cert", required=True)
    p.add_argument("--link-key", required=True)
    p.add_argument("--car-ca", required=True, help="CA that signs the cars' client certificates")
    p.add_argument("--artifact-url", help="base URL cars fetch artifacts from (default: https://<advertise>:<link port>)")
    p.add_argument("--kubelet-address", default="127.0.0.1:10250",
                   help="host:port of the kubelet API the API server dials for kubectl logs")
    p.add_argument("--kubelet-cert", required=True, help="serving cert for the kubelet API, signed by the cluster CA")
    p.add_argument("--kubelet-key", required=True)
    p.add_argument("--kubelet-client-ca", required=True, help="CA of the API server's kubelet client certificate")
    p.add_argument("--artifact-dir", required=True, help="directory of the embedded content-addressed store")
    p.add_argument("--grant-key-file", required=True, help="file of >= 32 random bytes signing artifact grants")
    p.add_argument("--metrics-address", default="127.0.0.1:9090", help="host:port of /metrics, /healthz, /readyz")
    p.add_argument("--lease-renew-seconds", type=float, default=25.0)
    p.add_argument("--reconnect-grace-seconds", type=float, default=2.0,
                   help="a car whose link is back within this long is not reported NotReady")
    p.add_argument("--pod-progress-seconds", type=float, default=30.0,
                   help="a running pod's progress is written to its status at most this often")
    p.add_argument("--stop-resend-seconds", type=float, default=15.0,
                   help="a stop the car has not acted on is sent again after this long")
    p.add_argument("--deletion-slack-seconds", type=float, default=10.0,
                   help="after a deleted pod's grace period, how long to wait for its car to confirm the stop")
    p.add_argument("--link-heartbeat-seconds", type=float, default=30.0)
    p.add_argument("--link-dead-after-seconds", type=float, default=45.0)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SystemExit(f"fleetlet-shim: address {address!r} must be host:port (e.g. 127.0.0.1:8443)")
    return host.strip("[]"), int(port)


async def serve(args: argparse.Namespace, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    registry = CollectorRegistry()
    metrics = ShimMetrics(registry)
    link_host, link_port = split_address(args.link_address)
    kubelet_host, kubelet_port = split_address(args.kubelet_address)
    metrics_host, metrics_port = split_address(args.metrics_address)
    urls = tuple(u.strip() for u in args.replica_urls.split(",") if u.strip())
    settings = ShimSettings(
        shim_id=args.shim_id,
        replica=args.replica,
        replicas=args.replicas,
        replica_urls=urls,
        namespace=args.namespace,
        advertise_address=args.advertise_address,
        kubelet_port=kubelet_port,
        artifact_base_url=args.artifact_url or f"https://{args.advertise_address}:{link_port}",
        lease_renew_interval_s=args.lease_renew_seconds,
        reconnect_grace_s=args.reconnect_grace_seconds,
        pod_progress_interval_s=args.pod_progress_seconds,
        stop_resend_s=args.stop_resend_seconds,
        deletion_slack_s=args.deletion_slack_seconds,
    )
    if not 0 <= settings.replica < settings.replicas:
        raise SystemExit("fleetlet-shim: --replica must be in [0, --replicas)")
    if urls and len(urls) != settings.replicas:
        raise SystemExit("fleetlet-shim: --replica-urls must name one URL per replica")
    signer = GrantSigner(await asyncio.to_thread(Path(args.grant_key_file).read_bytes))
    store = BlobStore(args.artifact_dir)
    link_config = LinkConfig(heartbeat_seconds=args.link_heartbeat_seconds,
                             dead_after_seconds=args.link_dead_after_seconds)
    # Connections: every worker's write in flight, plus the long-lived watches.
    async with KubeClient(KubeConfig.load(args.kubeconfig), max_connections=settings.api_concurrency + 8,
                          observer=metrics.observe_call, on_retry=metrics.observe_retry) as kube:
        shim = Shim(kube, signer, metrics, settings, link_ssl(args.car_ca, args.link_cert, args.link_key),
                    link_config, registry)
        runners: list[web.AppRunner] = []

        async def listen(app: web.Application, host: str, port: int, ctx: object | None) -> None:
            runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            await web.TCPSite(runner, host, port, ssl_context=ctx, backlog=4096).start()  # type: ignore[arg-type]
            runners.append(runner)

        # Health first, so a probe can tell "starting" (readyz 503) from "dead".
        await listen(health_app(registry, shim.ready.is_set, "caches not synced or listeners not up yet"),
                     metrics_host, metrics_port, None)
        try:
            await shim.start()
            # One TLS listener for cars: the link and the artifact store (grants scope what each car may fetch).
            await shim.link.start(link_host, link_port, app=make_app(store, signer))
            kubelet = KubeletApi(shim.pod_sync, shim.logs, shim.api.may_proxy_node)
            await listen(kubelet.app(), kubelet_host, kubelet_port,
                         kubelet_ssl(args.kubelet_cert, args.kubelet_key, args.kubelet_client_ca))
            shim.ready.set()
            log.info("shim %s (replica %d/%d) serving: cars on %s, kubelet API on %s, metrics on %s",
                     settings.shim_id, settings.replica, settings.replicas, args.link_address,
                     args.kubelet_address, args.metrics_address)
            if ready is not None:
                ready.set()
            await stop.wait()
        finally:
            await shim.link.stop()
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
