"""The light example workload: an MLP on scikit-learn's bundled digits data, exported to ONNX.

Used for fast, exact tests and the demo: 1,797 8x8 images whose true labels are known, and a model whose own
predictions (``expected_predictions.npy``) let a test check a car's results item by item. Far too light to show
what a car is worth; see ``fleetlet.models.minilm`` for the realistic workload.

Building trains the model (about a second on one core) and is cached on disk, keyed by the versions of
scikit-learn, skl2onnx, onnx, numpy and this module's code, so a second call only reads a small manifest. Build-side only:
needs the ``models`` extra (scikit-learn, skl2onnx) and must never run on a car.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._files import npy_bytes, write_atomic

log = logging.getLogger(__name__)

# Part of the cache key (with this file's own digest); bump when the recipe's meaning changes.
DIGITS_VERSION = "1"
INPUT_NAME = "input"
LABEL_NAME = "label"
PROBABILITIES_NAME = "probabilities"
N_FEATURES = 64
HIDDEN_UNITS = 64
RANDOM_STATE = 0
MAX_ITER = 300
# Pinned so that the exported bytes (and so the digest) do not move with skl2onnx's default.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}

_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DigitsArtifacts:
    """Paths and digests of the built digits example; every array has 1,797 rows along axis 0."""

    model_path: Path
    model_sha256: str
    inputs_path: Path  # float32 [1797, 64], raw pixel intensities 0..16
    inputs_sha256: str
    labels_path: Path  # int64 [1797], the true digits
    labels_sha256: str
    expected_predictions_path: Path  # int64 [1797], what the ONNX model itself predicts
    expected_predictions_sha256: str
    accuracy: float  # of the model against the true labels, on the same data it was trained on
    items: int


def _cache_key() -> str:
    import onnx
    import skl2onnx
    import sklearn

    parts = ";".join(
        [
            f"digits={DIGITS_VERSION}",
            "code=" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
            f"sklearn={sklearn.__version__}",
            f"skl2onnx={skl2onnx.__version__}",
            f"onnx={onnx.__version__}",
            f"numpy={np.__version__}",
        ]
    )
    return hashlib.sha256(parts.encode()).hexdigest()[:16]


def make_classifier() -> Any:
    """The untrained MLPClassifier with the fixed recipe (shared with the tests' held-out check)."""
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), random_state=RANDOM_STATE, max_iter=MAX_ITER)


def train_digits() -> tuple[Any, np.ndarray, np.ndarray]:
    """Train the MLP deterministically; returns (fitted MLPClassifier, inputs float32 [N,64], labels int64 [N])."""
    from sklearn.datasets import load_digits
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    data = load_digits()
    inputs = np.ascontiguousarray(data.data, dtype=np.float32)
    labels = np.ascontiguousarray(data.target, dtype=np.int64)
    model = make_classifier()
    # One BLAS thread: the result does not depend on the machine's core count, and it is faster on a busy box.
    with threadpool_limits(1):
        model.fit(inputs, labels)
    return model, inputs, labels


def export_digits(model: Any) -> bytes:
    """Export a fitted classifier to ONNX bytes: input float32 [N,64]; outputs label int64, probabilities float32."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    onx = convert_sklearn(
        model,
        name="fleetlet-digits-mlp",
        initial_types=[(INPUT_NAME, FloatTensorType([None, N_FEATURES]))],
        options={id(model): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    # skl2onnx names outputs "label" and "probabilities" with zipmap off; fail loudly if that ever changes.
    names = [o.name for o in onx.graph.output]
    if names != [LABEL_NAME, PROBABILITIES_NAME]:
        raise RuntimeError(f"unexpected ONNX outputs {names}; update fleetlet.models.digits")
    data: bytes = onx.SerializeToString()
    return data


def predict_onnx(model_path: Path, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run the exported model with onnxruntime on one thread; returns (labels int64, probabilities float32)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    label, proba = session.run([LABEL_NAME, PROBABILITIES_NAME], {INPUT_NAME: inputs})
    return np.asarray(label, dtype=np.int64), np.asarray(proba, dtype=np.float32)


def _load_cached(directory: Path) -> DigitsArtifacts | None:
    manifest = directory / _MANIFEST
    try:
        raw = json.loads(manifest.read_text())
        artifacts = DigitsArtifacts(
            **{k: (directory / v if k.endswith("_path") else v) for k, v in raw.items()}
        )
    except (OSError, ValueError, TypeError):
        return None
    files = (
        artifacts.model_path,
        artifacts.inputs_path,
        artifacts.labels_path,
        artifacts.expected_predictions_path,
    )
    if not all(p.is_file() for p in files):
        return None
    return artifacts


def build_digits(cache_dir: Path) -> DigitsArtifacts:
    """Build (or reuse from ``cache_dir``) the digits model, its inputs, true labels and expected predictions."""
    directory = Path(cache_dir) / f"digits-{_cache_key()}"
    cached = _load_cached(directory)
    if cached is not None:
        return cached

    directory.mkdir(parents=True, exist_ok=True)
    model, inputs, labels = train_digits()
    blobs = {
        "model.onnx": export_digits(model),
        "inputs.npy": npy_bytes(inputs),
        "labels.npy": npy_bytes(labels),
    }
    digests = {name: write_atomic(directory / name, data) for name, data in blobs.items()}
    predictions, _ = predict_onnx(directory / "model.onnx", inputs)
    digests["expected_predictions.npy"] = write_atomic(
        directory / "expected_predictions.npy", npy_bytes(predictions)
    )
    artifacts = DigitsArtifacts(
        model_path=directory / "model.onnx",
        model_sha256=digests["model.onnx"],
        inputs_path=directory / "inputs.npy",
        inputs_sha256=digests["inputs.npy"],
        labels_path=directory / "labels.npy",
        labels_sha256=digests["labels.npy"],
        expected_predictions_path=directory / "expected_predictions.npy",
        expected_predictions_sha256=digests["expected_predictions.npy"],
        accuracy=float(np.mean(predictions == labels)),
        items=int(inputs.shape[0]),
    )
    manifest = {k: (v.name if isinstance(v, Path) else v) for k, v in asdict(artifacts).items()}
    # The manifest is written last: its presence means every file above is complete.
    write_atomic(directory / _MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    log.info("built digits model in %s (accuracy %.4f)", directory, artifacts.accuracy)
    return artifacts
