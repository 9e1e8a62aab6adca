"""Apply the VehicleNodes of the chart's SIMULATED fleet: the init container of its fleetlet-sim pod runs this.

fleetlet-sim never touches the Kubernetes API (its cars hold no API credential), so this separate step applies
the same VehicleNodes that ``fleetlet-sim --print-vehiclenodes N --seed S`` prints, labelled with the release,
by server-side apply under the pod's ServiceAccount (its Role: get, create and patch VehicleNodes). Applying
again is harmless: the owner's fields are this field manager's and nothing else is touched.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from fleetlet_car.sim import make_vehicle_specs

from fleetlet.api.v1alpha1 import VehicleNode
from fleetlet.kube import ApiError, KubeClient, KubeConfig, resource_path

FIELD_MANAGER = "fleetlet-sim-chart"


def bodies(cars: int, seed: int, instance: str) -> list[dict[str, object]]:
    out = []
    for spec in make_vehicle_specs(cars, seed):
        vn = VehicleNode(metadata={"name": spec.vehicle_id}, spec=spec)  # type: ignore[arg-type]
        body = vn.wire(exclude={"status"})
        body["metadata"]["labels"] = {**(body["metadata"].get("labels") or {}),
                                      "app.kubernetes.io/instance": instance,
                                      "app.kubernetes.io/managed-by": FIELD_MANAGER}
        out.append(body)
    return out


async def apply(docs: list[dict[str, object]], kubeconfig: str | None, wait_s: float = 120.0) -> None:
    async with KubeClient(KubeConfig.load(kubeconfig)) as kube:
        deadline = time.monotonic() + wait_s
        for doc in docs:
            name = doc["metadata"]["name"]  # type: ignore[index]
            path = resource_path("fleetlet.io/v1alpha1", "vehiclenodes", name=name)
            while True:
                try:
                    await kube.apply(path, doc, FIELD_MANAGER)
                    break
                except ApiError as exc:
                    # Installed with the chart, the CRD may not be served yet: wait for it, then give up loudly.
                    if not exc.not_found or time.monotonic() > deadline:
                        raise
                    print(f"vehiclenode/{name}: the VehicleNode CRD is not served yet; retrying", flush=True)
                    await asyncio.sleep(2)
            print(f"vehiclenode/{name} applied", flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cars", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--instance", required=True, help="the Helm release (label app.kubernetes.io/instance)")
    p.add_argument("--kubeconfig", help="default: in-cluster (the pod's ServiceAccount)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    asyncio.run(apply(bodies(args.cars, args.seed, args.instance), args.kubeconfig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
