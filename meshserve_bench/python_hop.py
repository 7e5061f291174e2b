"""What a Python model's process hop costs: the same identity model run in this process
and through ``model_workers.python_runner.PythonModel`` (shared areas and a pipe).

``python -m meshserve_bench.python_hop`` prints, per tensor size, the median time of
one call each way and their difference: the overhead a Python model adds to its own
computation (one copy into the shared input area, two pipe messages, one copy out).
The worker's own batching, queueing and gateway costs are the same for both and are
left out.

``--stream`` adds a decoupled model's figure: the median µs per response of a
generator that yields its input ``RESPONSES`` times (one pipe round trip and one copy
out per response; the partial reply's Redis write is not in it).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshserve.models.repository import load_model
from model_workers.python_runner import PythonModel

IDENTITY_PY = """\
class Model:
    def execute(self, inputs):
        return {"y": inputs["x"]}
"""
STREAM_PY = """\
class Model:
    def execute(self, inputs):
        for _ in range(200):
            yield {"y": inputs["x"]}
"""
SIZES_BYTES = (1024, 1024 * 1024)
RESPONSES = 200  # what STREAM_PY yields


@dataclass(frozen=True, slots=True)
class HopFigures:
    """Median µs per call of identity on ``size_bytes`` in this process and through the process hop."""

    size_bytes: int
    in_process_us: float
    python_model_us: float

    @property
    def overhead_us(self) -> float:
        return self.python_model_us - self.in_process_us


def write_identity(repository: Path, size_bytes: int, *, stream: bool = False) -> Path:
    """``identity``: a batched Python model answering its UINT8 input of ``size_bytes`` as is
    (``stream``: decoupled, ``RESPONSES`` times)."""
    model_dir = repository / "identity"
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.yaml").write_text(
        f"backend: python\nmax_batch_size: 1\ndecoupled: {'true' if stream else 'false'}\n"
        f"input: [{{name: x, datatype: UINT8, dims: [{size_bytes}]}}]\n"
        f"output: [{{name: y, datatype: UINT8, dims: [{size_bytes}]}}]\n"
    )
    (model_dir / "1" / "model.py").write_text(STREAM_PY if stream else IDENTITY_PY)
    return model_dir


def _identity(inputs: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
    """In process, what a caller of the runner gets: an array it owns (the runner copies out too)."""
    return [inputs["x"].copy()]


def measure(size_bytes: int, calls: int = 500) -> HopFigures:
    """Time ``calls`` identity calls each way on one ``size_bytes`` tensor (after 20 unmeasured)."""
    with tempfile.TemporaryDirectory() as root:
        model = PythonModel(load_model(write_identity(Path(root), size_bytes), 1))
        try:
            model.warm_up()
            feed = {"x": np.random.default_rng(0).integers(0, 255, (1, size_bytes), np.uint8)}
            if not np.array_equal(model.run(feed)[0], feed["x"]):
                raise AssertionError("the Python model did not answer its input")
            return HopFigures(size_bytes, _median_us(_identity, feed, calls), _median_us(model.run, feed, calls))
        finally:
            model.close()


def measure_stream(size_bytes: int, calls: int = 20) -> float:
    """Median µs per response of a decoupled identity yielding ``RESPONSES`` times (after 3 unmeasured)."""
    with tempfile.TemporaryDirectory() as root:
        model = PythonModel(load_model(write_identity(Path(root), size_bytes, stream=True), 1))
        try:
            model.warm_up()
            feed = {"x": np.random.default_rng(0).integers(0, 255, (1, size_bytes), np.uint8)}
            got: list[int] = []

            def respond(outputs: list[np.ndarray[Any, Any]]) -> bool:
                got.append(outputs[0].nbytes)
                return True

            def stream(feed: dict[str, np.ndarray[Any, Any]]) -> None:
                model.stream(feed, None, respond)

            stream(feed)
            if got != [size_bytes] * RESPONSES:
                raise AssertionError("the decoupled model did not answer its input RESPONSES times")
            return _median_us(stream, feed, calls, warm=3) / RESPONSES
        finally:
            model.close()


def _median_us(run: Any, feed: dict[str, np.ndarray[Any, Any]], calls: int, warm: int = 20) -> float:
    for _ in range(warm):
        run(feed)
    times = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        run(feed)
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times) / 1000


def main() -> None:
    stream = "--stream" in sys.argv[1:]
    extra = f" {'per response':>14}" if stream else ""
    print(f"{'size':>8} {'in process':>12} {'python model':>14} {'overhead':>10}{extra}")
    for size in SIZES_BYTES:
        figures = measure(size)
        per_response = f" {measure_stream(size):>11.1f} µs" if stream else ""
        print(
            f"{size // 1024:>5} KiB {figures.in_process_us:>9.1f} µs {figures.python_model_us:>11.1f} µs"
            f" {figures.overhead_us:>7.1f} µs{per_response}"
        )


if __name__ == "__main__":
    main()
