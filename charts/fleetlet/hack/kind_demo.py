"""``make kind-demo``'s second half: the example FleetJob run by the chart's SIMULATED fleet in kind.

It builds the example model and input on this machine (``fleetlet.models.prepare_example``, as ``fleetlet demo``
does), streams each file into the in-cluster artifact store through the operator pod (``kubectl exec``: the store
is a directory on the release's volume, written with the store's own ``BlobStore``, which verifies the digest),
checks that the digests are those ``examples/fleetjob-digits.yaml`` names, applies it and waits for the job.

Interim: once ``fleetlet upload`` can reach an in-cluster store, this upload step becomes that command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "fleetjob-digits.yaml"
STORE = "/var/lib/fleetlet/artifacts"  # where the chart mounts the store in the operator and shim pods
PUT = (
    "import sys; from fleetlet.artifacts import BlobStore; "
    f"print(BlobStore({STORE!r}).put_bytes(sys.stdin.buffer.read(), expected=sys.argv[1]))"
)


def kubectl(ctx: list[str], *args: str, stdin: bytes | None = None) -> str:
    proc = subprocess.run(["kubectl", *ctx, *args], input=stdin, capture_output=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args[:3])} failed: {proc.stderr.decode().strip()}")
    return proc.stdout.decode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", required=True, help="kubectl context (kind-<cluster>)")
    p.add_argument("--namespace", required=True, help="the release's namespace")
    p.add_argument("--release", required=True)
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the job")
    args = p.parse_args(argv)
    ctx = ["--context", args.context]

    from fleetlet.cli.examples import REPEAT
    from fleetlet.models import prepare_example

    job = yaml.safe_load(EXAMPLE.read_text())
    print("• building the example model and input (fleetlet.models.prepare_example)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        example = prepare_example("digits", Path(tmp), repeat=REPEAT)
        for path, digest, field in ((example.model_path, example.model_sha256, "model"),
                                    (example.input_path, example.input_sha256, "input")):
            named = job["spec"][field]["sha256"]
            if digest != named:
                raise SystemExit(f"{EXAMPLE.name} names {field} sha256:{named}, but this build hashes to "
                                 f"sha256:{digest}: run `make examples`")
            pod = kubectl(ctx, "get", "pod", "-n", args.namespace, "-o", "name", "-l",
                          f"app.kubernetes.io/instance={args.release},app.kubernetes.io/component=operator").split()
            if not pod:
                raise SystemExit("no operator pod: run `make kind-up` first")
            print(f"• uploading {field} sha256:{digest[:12]}… ({path.stat().st_size} bytes) through {pod[0]}",
                  flush=True)
            kubectl(ctx, "exec", "-i", "-n", args.namespace, pod[0], "-c", "operator", "--",
                    "python", "-c", PUT, digest, stdin=path.read_bytes())
    kubectl(ctx, "apply", "-f", str(EXAMPLE))
    name, ns = job["metadata"]["name"], job["metadata"].get("namespace", "default")
    print(f"• applied fleetjob/{name} in {ns}; waiting for it (cars obey their owners' rules: some wait for "
          "their hours or a charge)", flush=True)
    deadline = time.monotonic() + args.timeout
    while True:
        status = json.loads(kubectl(ctx, "get", "fleetjob", name, "-n", ns, "-o", "json")).get("status") or {}
        shards = status.get("shards") or {}
        print(f"  phase {status.get('phase', 'Pending')}: {shards.get('verified', 0)}/{shards.get('total', '?')} "
              f"shards verified, {status.get('itemsDone', 0)} items done", flush=True)
        if status.get("phase") in ("Succeeded", "Failed"):
            print(kubectl(ctx, "get", "fleetjob", name, "-n", ns, "-o", "wide"))
            return 0 if status["phase"] == "Succeeded" else 1
        if time.monotonic() > deadline:
            print(f"timed out after {args.timeout:.0f}s; see kubectl describe fleetjob {name} -n {ns}")
            return 1
        time.sleep(10)


if __name__ == "__main__":
    sys.exit(main())
