"""The car's sandboxed model runtime: fetch artifacts by digest, run a shard's ONNX model in a sandboxed child.

Public surface: `fetch_artifact`, `Runner`/`Run` (the contract the agent drives) and `SandboxRunner` (the real
one), `SandboxedRun`, `RunSpec`, `ShardRef`, `Limits`, `Progress`, `RunResult`, `Reason`, `ProviderProbe`,
`choose_provider`, `results_match`. Importing this package is cheap: ONNX Runtime is loaded only inside the
child process (and inside the one-off provider probe).
It must never import the shim or the simulator, or give a model anything of the car (network, environment,
other files).
"""

from .fetch import DigestMismatch, FetchError, fetch_artifact
from .interface import Run, Runner, SandboxRunner
from .providers import ProviderProbe, choose_provider, shared_probe
from .results import results_match, sha256_file
from .sandbox import Limits, Progress, Reason, RunResult, RunSpec, SandboxedRun, ShardRef

__all__ = [
    "DigestMismatch",
    "FetchError",
    "Limits",
    "Progress",
    "ProviderProbe",
    "Reason",
    "Run",
    "RunResult",
    "RunSpec",
    "Runner",
    "SandboxRunner",
    "SandboxedRun",
    "ShardRef",
    "choose_provider",
    "fetch_artifact",
    "results_match",
    "sha256_file",
    "shared_probe",
]
