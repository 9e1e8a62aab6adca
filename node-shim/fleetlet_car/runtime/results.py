"""Result files of the car runtime: deterministic .npy/.npz writing, hashing, and comparison of replicas.

Two cars running the same shard must produce byte-identical result files whenever their outputs are identical,
so that the operator can verify replicas by digest: the encoding is ``fleetlet.arrays``, shared with the operator
so the two ends cannot drift (``numpy.savez`` stamps the current time into each zip entry and cannot be used).

Determinism caveat (read before verifying replicas by digest): ONNX Runtime's CPU kernels give bit-identical
float outputs for the same model and input when the build, the instruction set it dispatches to (AVX2 vs
AVX-512 vs NEON) and the intra-op thread count are the same. Across heterogeneous hardware, builds or execution
providers (CPU vs CUDA) the last bits may differ; the operator compares those replicas within a tolerance.
"""

from __future__ import annotations

from fleetlet.arrays import load_arrays, results_match, sha256_file, write_arrays

__all__ = ["load_arrays", "results_match", "sha256_file", "write_arrays"]
