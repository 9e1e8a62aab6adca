"""Example models Fleetlet's demo, tests and benchmarks submit as jobs, built locally and cached on disk.

Two workloads: ``digits`` (a tiny scikit-learn MLP, exact and fast, for tests) and ``minilm``
(all-MiniLM-L6-v2 sentence embeddings, the realistic batch job). Both are built from packages already
installed with the ``models`` extra; nothing is downloaded, and nothing here is imported on a car (cars receive
the model and input files by digest). Importing this package is cheap: the builders load their heavy
dependencies only when called.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from ._files import default_cache_dir, npy_bytes, sha256_file, write_atomic

if TYPE_CHECKING:
    from fleetlet.api.v1alpha1.fleetjob import InputFormat

__all__ = [
    "ExampleName",
    "PreparedExample",
    "default_cache_dir",
    "example_sentences",
    "prepare_example",
    "sha256_file",
]

ExampleName = Literal["digits", "minilm"]
DEFAULT_MINILM_ITEMS = 1024


class PreparedExample(NamedTuple):
    """What a job submission needs: the model and input files with their digests, item count and format."""

    model_path: Path
    model_sha256: str
    input_path: Path
    input_sha256: str
    items: int
    input_format: InputFormat


def example_sentences(count: int) -> list[str]:
    """``count`` distinct, deterministic English sentences to embed (a grammar walked in a fixed order)."""
    subjects = [
        "A man",
        "A woman",
        "The child",
        "An engineer",
        "The old farmer",
        "A student",
        "My neighbour",
        "The chef",
    ]
    verbs = ["is playing", "is repairing", "is painting", "is reading about", "is carrying", "is looking at"]
    objects = [
        "a guitar",
        "a bicycle",
        "the kitchen wall",
        "an electric car",
        "a small boat",
        "the garden fence",
    ]
    places = ["", " in the park", " at home", " near the river", " on a rainy afternoon", " after work"]
    times = ["", " today", " again", " quietly"]
    combos = itertools.product(times, places, objects, verbs, subjects)
    sentences = [f"{s} {v} {o}{p}{t}." for t, p, o, v, s in itertools.islice(combos, count)]
    if len(sentences) < count:
        raise ValueError(f"at most {len(sentences)} example sentences are available, asked for {count}")
    return sentences


def _place(source: Path, target: Path) -> None:
    """Put ``source`` at ``target``: a hard link when possible (the MiniLM model is 90 MB), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    tmp.replace(target)


def prepare_example(
    name: ExampleName, out_dir: Path, *, items: int | None = None, cache_dir: Path | None = None, repeat: int = 1
) -> PreparedExample:
    """Build example ``name`` and place ``model.onnx`` and its input in ``out_dir``, ready to submit.

    digits: the 1,797 images as ``npy`` (``items`` may take the first N; ``repeat`` tiles them that many times,
    for a job whose shards last long enough to watch). minilm: ``items`` example sentences (default 1,024),
    tokenized to 128 tokens, as ``npz``. Models are built once into ``cache_dir`` (default
    ``$FLEETLET_CACHE/models`` or ``~/.cache/fleetlet/models``). Same versions, same bytes: the digests are stable.
    """
    out_dir = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if items is not None and items < 1:
        raise ValueError(f"items must be at least 1, got {items}")

    if name == "digits":
        import numpy as np

        from .digits import build_digits

        digits = build_digits(cache)
        _place(digits.model_path, out_dir / "model.onnx")
        input_path = out_dir / "inputs.npy"
        if repeat > 1:
            base = np.load(digits.inputs_path)[:items]
            input_sha = write_atomic(input_path, npy_bytes(np.tile(base, (repeat, 1))))
            count = len(base) * repeat
        elif items is None or items >= digits.items:
            _place(digits.inputs_path, input_path)
            input_sha, count = digits.inputs_sha256, digits.items
        else:
            input_sha = write_atomic(input_path, npy_bytes(np.load(digits.inputs_path)[:items]))
            count = items
        return PreparedExample(
            out_dir / "model.onnx", digits.model_sha256, input_path, input_sha, count, "npy"
        )

    if name == "minilm":
        from .minilm import build_minilm, write_text_input

        minilm = build_minilm(cache)
        _place(minilm.model_path, out_dir / "model.onnx")
        count = items or DEFAULT_MINILM_ITEMS
        input_path = out_dir / "inputs.npz"
        input_sha = write_text_input(example_sentences(count), input_path)
        return PreparedExample(
            out_dir / "model.onnx", minilm.model_sha256, input_path, input_sha, count, "npz"
        )

    raise ValueError(f"unknown example {name!r}; choose 'digits' or 'minilm'")
