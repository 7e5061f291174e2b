"""One loaded model: an ONNX Runtime session, its warm-up, and batched runs.

``InferenceSession`` is the seam (a Protocol) so that GPU execution providers can
be chosen per device later (TODO(#6)); on the CPU the ONNX Runtime wheel is used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from meshserve.dtypes import NUMPY_BY_KSERVE
from meshserve.repository import ModelInfo

log = logging.getLogger(__name__)


class SanityCheckFailed(RuntimeError):
    """A model ran but its answer to the known sample input is wrong (shape, NaN, Inf)."""


class InferenceSession(Protocol):
    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any]) -> list[Any]: ...


class LoadedModel:
    """A model held by a worker. ``ready`` only after load, warm-up and a sanity check."""

    def __init__(self, info: ModelInfo, *, intra_op_threads: int = 0, spinning: bool = False) -> None:
        self.info = info
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # ONNX Runtime's threads spin between runs by default. On a host shared with
        # a gateway, Redis and other workers that spin takes the CPU they need: on a
        # 2-core machine it cost the mesh ~0.5 ms per request at concurrency 1.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session: InferenceSession = ort.InferenceSession(
            str(info.path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.output_names = [t.name for t in info.outputs]
        self.ready = False
        self._canary_feed: dict[str, np.ndarray[Any, Any]] | None = None

    def run(self, inputs: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """Run one batch; returns every output, in the model's output order."""
        return [np.asarray(out) for out in self.session.run(self.output_names, inputs)]

    def warm_up(self) -> float:
        """Run a generated input at batch 1 and at max batch; check outputs are sane.

        Returns the warm-up time in seconds. Raises :class:`SanityCheckFailed` if the
        model answers with the wrong batch size or with NaN or infinite floats, and
        whatever ONNX Runtime raises if it fails: such a model never reports ready.
        """
        started = time.perf_counter()
        sizes = [1] if self.info.max_batch_size == 0 else sorted({1, self.info.max_batch_size})
        for batch in sizes:
            self._check(self.run(self.sample_inputs(batch)), batch)
        self.ready = True
        return time.perf_counter() - started

    def canary(self) -> None:
        """Run the known sample input at batch 1 and check the answer, as warm-up does.

        Blocking (runs the model): call it in the worker's executor. Raises like
        ``warm_up``; leaves ``ready`` to the caller, which owns the model's health.
        """
        if self._canary_feed is None:
            self._canary_feed = self.sample_inputs(1)
        self._check(self.run(self._canary_feed), 1)

    def _check(self, outputs: list[np.ndarray[Any, Any]], batch: int) -> None:
        for spec, out in zip(self.info.outputs, outputs, strict=True):
            if self.info.max_batch_size and out.shape[:1] != (batch,):
                raise SanityCheckFailed(f"output '{spec.name}' has batch {out.shape[:1]} for an input batch of {batch}")
            if out.dtype.kind in "fc" and not np.isfinite(out).all():
                bad = int(out.size - np.count_nonzero(np.isfinite(out)))
                raise SanityCheckFailed(
                    f"output '{spec.name}' has {bad} non-finite values (NaN or Inf) of {out.size}"
                    f" on the sample input at batch {batch}"
                )

    def sample_inputs(self, batch: int) -> dict[str, np.ndarray[Any, Any]]:
        """Deterministic inputs of the right dtype and shape; symbolic dims become 8."""
        rng = np.random.default_rng(0)
        feed: dict[str, np.ndarray[Any, Any]] = {}
        for spec in self.info.inputs:
            shape = [d if d >= 0 else 8 for d in spec.shape]
            if self.info.max_batch_size:
                shape[0] = batch
            dtype = NUMPY_BY_KSERVE[spec.datatype]
            if spec.datatype == "BYTES":
                feed[spec.name] = np.full(shape, b"warmup", dtype=np.object_)
            elif dtype.kind == "f":
                feed[spec.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "b":
                feed[spec.name] = np.zeros(shape, dtype=dtype)
            else:
                feed[spec.name] = rng.integers(0, 8, shape).astype(dtype)
        return feed
