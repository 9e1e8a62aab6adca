"""The example FleetJob in ``examples/``, rendered from the example model and input as this version builds them.

A FleetJob names its model and input by digest, so the example must carry the real digests of what ``fleetlet
demo`` uploads (a placeholder would give a user a job that can never run). ``python -m fleetlet.cli.examples``
(``make examples``) rewrites ``examples/fleetjob-digits.yaml``; a unit test fails when the file and the build
disagree (a new scikit-learn or ONNX version can change the model's bytes).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from fleetlet.models import PreparedExample, prepare_example

REPEAT = 100  # the 1,797 digits, 100 times: shards long enough to watch cars drive off in the middle
SHARD_SIZE = 30_000
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleetjob-digits.yaml"

TEMPLATE = """\
# Classify 179,700 handwritten digits (scikit-learn's 1,797, 100 times) with a small MLP on parked cars: 6 shards,
# each run by two cars of different owners and accepted when both agree. The model and input are named by
# digest; `fleetlet demo` uploads exactly these (or: `fleetlet upload model.onnx inputs.npy` after building them
# with fleetlet.models.prepare_example("digits", out, repeat=100)). Rendered by `make examples`.
apiVersion: fleetlet.io/v1alpha1
kind: FleetJob
metadata:
  name: digits
  namespace: default
spec:
  model:
    uri: fleetlet://sha256/{model}
    sha256: {model}
    runtime: onnx
  input:
    uri: fleetlet://sha256/{input}
    sha256: {input}
    format: npy
    items: {items}
  shardSize: {shard_size}
  parallelism: 8
  resources: {{cpu: "1", memory: 1Gi}}
  placement: {{allowUnplugged: false}}
  verification: {{replicas: 2, quorum: 2}}
  retries: 3
  deadlineSeconds: 1800
  budget: {{maxEnergyKWh: 0.5, pricePerKWh: 0.40}}
"""


def build(out_dir: Path) -> PreparedExample:
    return prepare_example("digits", out_dir, repeat=REPEAT)


def render(example: PreparedExample) -> str:
    return TEMPLATE.format(model=example.model_sha256, input=example.input_sha256, items=example.items,
                           shard_size=SHARD_SIZE)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        text = render(build(Path(tmp)))
    EXAMPLE.write_text(text)
    print(f"wrote {EXAMPLE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
