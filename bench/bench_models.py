"""Throughput of the example models on one CPU thread, as a car's sandboxed runtime would run them.

Measures items/s of the MiniLM sentence-embedding model (batch 32, 128 tokens per item, the demo's input
shape; also at 32 tokens, for comparison) and of the digits MLP, with onnxruntime restricted to a single intra- and inter-op thread, and writes
the figures to ``bench/results/models.json``. The models are built (or taken from the cache) first; building
is not timed here.

    python bench/bench_models.py [--seconds 5] [--out bench/results/models.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fleetlet.models import default_cache_dir, example_sentences
from fleetlet.models.digits import build_digits
from fleetlet.models.minilm import build_minilm, tokenize

RESULTS = Path(__file__).resolve().parent / "results" / "models.json"


def _session(model_path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def _throughput(session: Any, feeds: Mapping[str, np.ndarray], seconds: float) -> dict[str, float]:
    """Run ``feeds`` repeatedly for about ``seconds``; report items/s and the per-batch latency percentiles."""
    batch = next(iter(feeds.values())).shape[0]
    session.run(None, dict(feeds))  # warm-up: first run allocates and picks kernels
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(latencies) < 3:
        start = time.perf_counter()
        session.run(None, dict(feeds))
        latencies.append(time.perf_counter() - start)
    total = sum(latencies)
    return {
        "items_per_s": round(batch * len(latencies) / total, 1),
        "batch": batch,
        "batches": len(latencies),
        "batch_latency_ms_p50": round(1000 * float(np.median(latencies)), 3),
        "batch_latency_ms_p90": round(1000 * float(np.percentile(latencies, 90)), 3),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(seconds: float, batch: int = 32, seq: int = 128) -> dict[str, Any]:
    import onnxruntime as ort

    cache = default_cache_dir()
    minilm = build_minilm(cache)
    digits = build_digits(cache)

    minilm_session = _session(minilm.model_path)
    text_feeds = tokenize(example_sentences(batch), max_length=seq)
    minilm_figures = _throughput(minilm_session, text_feeds, seconds)
    real_tokens = float(text_feeds["attention_mask"].mean())
    # The example sentences need under 20 tokens: what a tighter max_length would buy (cost grows with seq).
    short_seq = 32
    short_figures = _throughput(
        minilm_session, tokenize(example_sentences(batch), max_length=short_seq), seconds
    )

    digit_inputs = np.load(digits.inputs_path)
    digits_figures = _throughput(_session(digits.model_path), {"input": digit_inputs}, seconds)

    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": _cpu_model(),
            "cpus_visible": os.cpu_count(),
            "load_average_1m_at_start": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
        },
        "threads": 1,
        "minilm": {
            "model_sha256": minilm.model_sha256,
            "seq": seq,
            "real_token_share": round(real_tokens, 3),
            **minilm_figures,
        },
        f"minilm_seq{short_seq}": {"seq": short_seq, **short_figures},
        "digits": {"model_sha256": digits.model_sha256, **digits_figures},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="timed run per model")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    figures = run(args.seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
