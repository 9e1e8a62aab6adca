"""The digits example: a deterministic, accurate model whose ONNX export predicts exactly what sklearn does.

The built artifacts are cached like MiniLM's; every run still trains once more to compare against them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")

from fleetlet.models import default_cache_dir, prepare_example, sha256_file  # noqa: E402
from fleetlet.models.digits import (  # noqa: E402
    DigitsArtifacts,
    build_digits,
    export_digits,
    make_classifier,
    predict_onnx,
    train_digits,
)


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    # The shared cache ($FLEETLET_CACHE/models or ~/.cache/fleetlet/models): only the first run trains for it.
    return default_cache_dir()


@pytest.fixture(scope="module")
def artifacts(cache_dir: Path) -> DigitsArtifacts:
    return build_digits(cache_dir)


@pytest.fixture(scope="module")
def trained() -> tuple[Any, np.ndarray, np.ndarray]:
    """A second, independent training run with the same recipe."""
    return train_digits()


def test_model_is_accurate_on_the_digits(artifacts: DigitsArtifacts) -> None:
    labels = np.load(artifacts.labels_path)
    predictions = np.load(artifacts.expected_predictions_path)
    assert artifacts.items == labels.shape[0] == predictions.shape[0] == 1797
    assert artifacts.accuracy == pytest.approx(float(np.mean(predictions == labels)))
    assert artifacts.accuracy > 0.95


def test_recipe_generalises_to_held_out_digits(trained: tuple[Any, np.ndarray, np.ndarray]) -> None:
    # The shipped model is trained on all 1,797 images, so its accuracy above is a training figure; this
    # shows the same recipe is not merely memorising.
    from sklearn.model_selection import train_test_split
    from threadpoolctl import threadpool_limits

    _, inputs, labels = trained
    x_train, x_test, y_train, y_test = train_test_split(inputs, labels, test_size=0.25, random_state=0)
    with threadpool_limits(1):
        score = make_classifier().fit(x_train, y_train).score(x_test, y_test)
    assert score > 0.95


def test_onnx_predicts_exactly_what_sklearn_predicts(
    artifacts: DigitsArtifacts, trained: tuple[Any, np.ndarray, np.ndarray]
) -> None:
    model, inputs, _ = trained
    np.testing.assert_array_equal(np.load(artifacts.inputs_path), inputs)
    labels, probabilities = predict_onnx(artifacts.model_path, inputs)
    np.testing.assert_array_equal(labels, model.predict(inputs))
    np.testing.assert_array_equal(np.load(artifacts.expected_predictions_path), labels)
    np.testing.assert_allclose(probabilities, model.predict_proba(inputs), atol=1e-5)
    assert probabilities.dtype == np.float32 and labels.dtype == np.int64


def test_training_and_export_are_deterministic(
    artifacts: DigitsArtifacts, trained: tuple[Any, np.ndarray, np.ndarray]
) -> None:
    import hashlib

    assert hashlib.sha256(export_digits(trained[0])).hexdigest() == artifacts.model_sha256


def test_inputs_are_float32_rows_of_64_pixels(artifacts: DigitsArtifacts) -> None:
    inputs = np.load(artifacts.inputs_path)
    assert inputs.dtype == np.float32 and inputs.shape == (1797, 64)


def test_digests_match_the_files(artifacts: DigitsArtifacts) -> None:
    assert sha256_file(artifacts.model_path) == artifacts.model_sha256
    assert sha256_file(artifacts.inputs_path) == artifacts.inputs_sha256
    assert sha256_file(artifacts.labels_path) == artifacts.labels_sha256
    assert sha256_file(artifacts.expected_predictions_path) == artifacts.expected_predictions_sha256


def test_second_build_reuses_the_cache(artifacts: DigitsArtifacts, cache_dir: Path) -> None:
    mtime = artifacts.model_path.stat().st_mtime_ns
    start = time.perf_counter()
    again = build_digits(cache_dir)
    elapsed = time.perf_counter() - start
    assert again == artifacts
    assert again.model_path.stat().st_mtime_ns == mtime, "the model was rebuilt instead of reused"
    assert elapsed < 0.5


def test_prepare_example_places_model_and_input_for_submission(
    artifacts: DigitsArtifacts, cache_dir: Path, tmp_path: Path
) -> None:
    prepared = prepare_example("digits", tmp_path / "job", cache_dir=cache_dir)
    assert prepared.model_sha256 == artifacts.model_sha256 == sha256_file(prepared.model_path)
    assert prepared.input_sha256 == artifacts.inputs_sha256 == sha256_file(prepared.input_path)
    assert (prepared.items, prepared.input_format) == (1797, "npy")

    first_ten = prepare_example("digits", tmp_path / "small", items=10, cache_dir=cache_dir)
    assert np.load(first_ten.input_path).shape == (10, 64)
    assert first_ten.input_sha256 == sha256_file(first_ten.input_path)


def test_prepare_example_refuses_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown example"):
        prepare_example("resnet", tmp_path)  # type: ignore[arg-type]
