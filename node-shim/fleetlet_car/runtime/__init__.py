"""The car's sandboxed model runtime: fetch artifacts by digest, run a shard's ONNX model in a sandboxed child.

Public surface: `fetch_artifact`, `SandboxedRun`, `RunSpec`, `Limits`, `Progress`, `RunResult`, `Reason`,
`results_match`. Importing this package is cheap: ONNX Runtime is loaded only inside the child process.
It must never import the shim or give a model anything of the car (network, environment, other files).
"""

from .fetch import DigestMismatch, FetchError, fetch_artifact
from .results import results_match, sha256_file
from .sandbox import Limits, Progress, Reason, RunResult, RunSpec, SandboxedRun

__all__ = [
    "DigestMismatch",
    "FetchError",
    "Limits",
    "Progress",
    "Reason",
    "RunResult",
    "RunSpec",
    "SandboxedRun",
    "fetch_artifact",
    "results_match",
    "sha256_file",
]
