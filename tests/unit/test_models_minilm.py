"""The MiniLM example: the hand-built ONNX graph computes the model's embeddings, and its inputs fit it.

The build (about 90 MB) is cached in $FLEETLET_CACHE/models or ~/.cache/fleetlet/models, so only the first
run pays for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("scipy")
ort = pytest.importorskip("onnxruntime")

from fleetlet.models import default_cache_dir, prepare_example, sha256_file  # noqa: E402
from fleetlet.models.minilm import (  # noqa: E402
    INPUT_NAMES,
    OUTPUT_NAME,
    MiniLMArtifacts,
    MiniLMConfig,
    build_minilm,
    load_config,
    load_weights,
    model_dir,
    reference_forward,
    tokenize,
    write_text_input,
)

try:
    model_dir()
except FileNotFoundError as exc:  # pragma: no cover - only without the models extra
    pytest.skip(str(exc), allow_module_level=True)

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays a musical instrument.",
    "The stock market fell sharply today.",
    "Fleetlet runs batch inference on parked electric cars while their owners sleep.",
    "Hi",
]
SEQ = 24  # longer than every sentence above, so every row carries padding


@pytest.fixture(scope="module")
def artifacts() -> MiniLMArtifacts:
    return build_minilm(default_cache_dir())


@pytest.fixture(scope="module")
def session(artifacts: MiniLMArtifacts) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(artifacts.model_path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def config() -> MiniLMConfig:
    return load_config()


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return load_weights()


def embed(session: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    (out,) = session.run([OUTPUT_NAME], feeds)
    return np.asarray(out)


@pytest.fixture(scope="module")
def feeds() -> dict[str, np.ndarray]:
    return tokenize(SENTENCES, max_length=SEQ)


@pytest.fixture(scope="module")
def embeddings(session: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return embed(session, feeds)


def test_graph_has_the_declared_interface(session: Any, config: MiniLMConfig) -> None:
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        (name, "tensor(int64)", ["batch", "seq"]) for name in INPUT_NAMES
    ]
    (output,) = session.get_outputs()
    assert (output.name, output.type, output.shape) == (
        OUTPUT_NAME,
        "tensor(float)",
        ["batch", config.hidden_size],
    )


def test_onnx_matches_the_numpy_reference(
    embeddings: np.ndarray, feeds: dict[str, np.ndarray], weights: dict[str, np.ndarray], config: MiniLMConfig
) -> None:
    assert feeds["attention_mask"].sum(1).max() < SEQ, "every row should carry padding"
    expected = reference_forward(weights, config, **feeds)
    assert embeddings.shape == (len(SENTENCES), config.hidden_size) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, expected, atol=1e-4, rtol=0)


def test_embeddings_have_unit_norm(embeddings: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_similar_sentences_are_closer_than_unrelated_ones(embeddings: np.ndarray) -> None:
    guitar, instrument, market = embeddings[0], embeddings[1], embeddings[2]
    assert guitar @ instrument > guitar @ market + 0.3


def test_padding_does_not_change_an_embedding(session: Any, embeddings: np.ndarray) -> None:
    short = embed(session, tokenize(SENTENCES[:1], max_length=12))
    long = embed(session, tokenize(SENTENCES[:1], max_length=64))
    np.testing.assert_allclose(short[0], embeddings[0], atol=1e-5)
    np.testing.assert_allclose(long[0], embeddings[0], atol=1e-5)


def test_a_row_without_tokens_embeds_to_zeros_not_nan(session: Any, feeds: dict[str, np.ndarray]) -> None:
    blank = {name: np.zeros((1, SEQ), np.int64) for name in INPUT_NAMES}
    out = embed(session, blank)
    assert np.all(out == 0.0)


def test_tokenizer_pads_and_truncates_to_a_fixed_length() -> None:
    arrays = tokenize(["word " * 400, "short"], max_length=16)
    assert set(arrays) == set(INPUT_NAMES)
    for array in arrays.values():
        assert array.shape == (2, 16) and array.dtype == np.int64
    assert arrays["attention_mask"][0].all(), "the long text fills every position"
    assert arrays["attention_mask"][1].sum() == 3  # [CLS] short [SEP]
    assert arrays["input_ids"][0, 0] == 101 and arrays["input_ids"][0, -1] == 102  # [CLS] ... [SEP]


def test_tokenizer_refuses_lengths_the_model_was_not_trained_for(config: MiniLMConfig) -> None:
    with pytest.raises(ValueError, match="max_seq_length"):
        tokenize(["x"], max_length=config.max_seq_length + 1)


def test_text_input_is_a_deterministic_npz_that_fits_the_model(session: Any, tmp_path: Path) -> None:
    digest = write_text_input(SENTENCES, tmp_path / "a.npz", max_length=SEQ)
    assert digest == sha256_file(tmp_path / "a.npz")
    assert write_text_input(SENTENCES, tmp_path / "b.npz", max_length=SEQ) == digest, (
        "same texts, same digest"
    )
    with np.load(tmp_path / "a.npz", allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    assert sorted(arrays) == sorted(INPUT_NAMES)
    assert {a.shape for a in arrays.values()} == {(len(SENTENCES), SEQ)}
    assert embed(session, arrays).shape[0] == len(SENTENCES)


def test_build_is_cached_with_matching_digest(artifacts: MiniLMArtifacts) -> None:
    assert build_minilm(default_cache_dir()) == artifacts
    assert sha256_file(artifacts.model_path) == artifacts.model_sha256
    assert sha256_file(artifacts.tokenizer_path) == artifacts.tokenizer_sha256


def test_prepare_example_gives_a_submittable_job(
    artifacts: MiniLMArtifacts, session: Any, tmp_path: Path
) -> None:
    prepared = prepare_example("minilm", tmp_path, items=40)
    assert prepared.model_sha256 == artifacts.model_sha256
    assert (prepared.items, prepared.input_format) == (40, "npz")
    assert prepared.input_sha256 == sha256_file(prepared.input_path)
    with np.load(prepared.input_path) as npz:
        rows = {name: npz[name][:2] for name in INPUT_NAMES}
        assert npz["input_ids"].shape[0] == 40
    assert embed(session, rows).shape == (2, artifacts.hidden_size)
