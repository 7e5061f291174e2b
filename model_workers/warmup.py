"""Which inputs a model's warm-up runs: the config's samples, or guessed sizes.

A model's config.yaml may give warm-up samples (``meshserve/models/warmup.py``):
they are used as given. Without them, every input is filled with generated values,
and a symbolic non-batch dim (a detector's height and width, a text model's
sequence length) needs a size. No single size fits every network (a stride-32
detector needs multiples of 32, a text model a length under its position table), so
:data:`GUESSED_SIZES` are tried in order, the same size for every symbolic dim, and
the first that runs is kept. When none runs, the model is served without warm-up:
a model's readiness never depends on a guess of its input size (the session says
``warmed`` and a WARNING names the sizes tried and the config that fixes it).

Plain code, no ONNX Runtime: the session (``model_workers/session.py``) runs what
this module builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from meshserve.models.repository import ANY_DIM, ModelInfo, TensorInfo
from meshserve.models.warmup import WarmupInput, WarmupSample
from meshserve.wire.codec import to_array
from meshserve.wire.dtypes import NUMPY_BY_KSERVE
from protos import meshserve_pb2 as mpb

GUESSED_SIZES = (224, 256, 320, 640, 32, 64)
"""Sizes tried, in order, for symbolic non-batch dims when the config gives no
warm-up: common image sides first (classifiers, then detectors), then small ones
that fit short sequences."""

Feed = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True, slots=True)
class WarmupInputs:
    """One way to fill every input: one item per input, repeated to any batch size.

    ``batch_size`` is the config sample's own (run as given, as Triton does); None
    for generated inputs. ``guessed`` says the item sizes are a guess, so a failure
    to run them says nothing of the model.
    """

    label: str  # for the log: "config sample 'x'", "symbolic dims = 224", "the graph's shapes"
    items: dict[str, np.ndarray[Any, Any]]
    batch_size: int | None
    guessed: bool

    def feed(self, batch: int, batching: bool) -> Feed:
        """The inputs at ``batch`` items (each input's item repeated); ``batching``:
        the model has a batch dim (otherwise the item is the whole tensor)."""
        if not batching:
            return dict(self.items)
        return {name: np.repeat(item[np.newaxis], batch, axis=0) for name, item in self.items.items()}


def candidates(info: ModelInfo) -> tuple[WarmupInputs, ...]:
    """What to try, in order: the config's samples (all of them are run), else the
    graph's own shapes when no non-batch dim is symbolic, else one guess per size."""
    if info.warmup:
        return tuple(_from_sample(info, sample) for sample in info.warmup)
    batching = info.max_batch_size > 0
    if not has_symbolic_dims(info):
        return (WarmupInputs("the graph's shapes", _generated(info.inputs, batching, 0), None, False),)
    return tuple(
        WarmupInputs(f"symbolic dims = {size}", _generated(info.inputs, batching, size), None, True)
        for size in GUESSED_SIZES
    )


def has_symbolic_dims(info: ModelInfo) -> bool:
    """Whether some input has a symbolic dim other than the batch dim."""
    start = 1 if info.max_batch_size > 0 else 0
    return any(ANY_DIM in t.shape[start:] for t in info.inputs)


def no_fit_warning(info: ModelInfo, tried: list[tuple[WarmupInputs, str]]) -> str:
    """The one WARNING of a model served without warm-up: what was tried, why each
    failed (the first error in full, then the sizes) and how to give the inputs."""
    sizes = ", ".join(str(size) for size in GUESSED_SIZES)
    first = tried[0][1] if tried else "nothing tried"
    return (
        f"model {info.name} version {info.version}: no warm-up input fits its symbolic dims"
        f" (tried {sizes} for every symbolic non-batch dim; at {GUESSED_SIZES[0]}: {first});"
        " serving it without warm-up, so the first requests pay for it. Give the sizes in"
        f" {info.path.parent.parent / 'config.yaml'} under 'warmup:' (see docs/models.md#warm-up)"
    )


def _from_sample(info: ModelInfo, sample: WarmupSample) -> WarmupInputs:
    specs = {t.name: t for t in info.inputs}
    items = {item.name: _configured(specs[item.name], item) for item in sample.inputs}
    return WarmupInputs(f"config sample '{sample.name}'", items, sample.batch_size, False)


def _configured(spec: TensorInfo, item: WarmupInput) -> np.ndarray[Any, Any]:
    """One item as the config describes it: generated, or read from its file."""
    if item.data == "file" and item.file is not None:
        data = item.file.read_bytes()
        try:
            return to_array(mpb.Tensor(name=spec.name, datatype=spec.datatype, shape=item.dims, data=data))
        except ValueError as exc:
            raise ValueError(
                f"warm-up file {item.file} for input '{spec.name}' ({len(data)} bytes) does not hold one"
                f" {spec.datatype} item of dims {list(item.dims)}: {exc}"
            ) from exc
    return _values(spec.datatype, item.dims, zeros=item.data == "zeros")


def _generated(inputs: tuple[TensorInfo, ...], batching: bool, size: int) -> dict[str, np.ndarray[Any, Any]]:
    """Random items with every symbolic non-batch dim set to ``size``."""
    start = 1 if batching else 0
    return {
        t.name: _values(t.datatype, tuple(d if d >= 0 else size for d in t.shape[start:]), zeros=False) for t in inputs
    }


def _values(datatype: str, dims: tuple[int, ...], *, zeros: bool) -> np.ndarray[Any, Any]:
    """Deterministic values: floats from a normal law, integers in [0, 8) (valid as
    indices into most tables), booleans and zeros as zeros, BYTES as "warmup"."""
    rng = np.random.default_rng(0)
    dtype = NUMPY_BY_KSERVE[datatype]
    if datatype == "BYTES":
        return np.full(dims, "" if zeros else "warmup", dtype=np.object_)
    if zeros or dtype.kind == "b":
        return np.zeros(dims, dtype=dtype)
    if dtype.kind == "f":
        return rng.standard_normal(dims).astype(dtype)
    return rng.integers(0, 8, dims).astype(dtype)
