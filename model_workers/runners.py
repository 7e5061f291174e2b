"""The seam between the worker and a kind of model: what every model runner offers.

Two kinds implement it: ``session.LoadedModel`` (an ONNX Runtime session, the
default) and ``python_runner.PythonModel`` (config.yaml ``backend: python``: model.py
in processes of its own). The worker picks one per model at load
(``assignment.AssignmentFollower.load``); batching, deadlines, priorities, tenants,
traces and metrics live outside the runner and work alike for both.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from meshserve.models.repository import ModelInfo
from model_workers.engines import EngineSetting, Trial


class ModelRunner(Protocol):
    """One loaded model version. ``ready`` only after ``warm_up``; the health checks set it after."""

    info: ModelInfo
    ready: bool
    engine: EngineSetting  # ONNX Runtime's CPU thread setting (a label in the metrics)
    engine_source: str
    engine_trials: tuple[Trial, ...]

    @property
    def may_run_inline(self) -> bool:
        """Whether a quick batch may run on the event loop's thread (stopped there at a short limit)."""
        ...

    @property
    def warmed(self) -> bool:
        """Whether warm-up ran an input (the canary runs the same one)."""
        ...

    def warm_up(self) -> float:
        """Make it ready to run (sessions, processes, first runs); seconds taken. Blocking."""
        ...

    def run(self, inputs: dict[str, np.ndarray[Any, Any]], options: Any = None) -> list[np.ndarray[Any, Any]]:
        """One batch of named arrays; every output, in ``info.outputs`` order. Blocking.

        ``options``: ONNX Runtime ``RunOptions`` whose ``terminate`` the worker's
        watchdog sets to stop the run (``model_workers/stops.py``)."""
        ...

    def compute_cpu_s(self) -> float | None:
        """CPU seconds this process's threads spent computing the model so far (None:
        not known here, e.g. a model computed in processes of its own)."""
        ...

    def canary(self, options: Any = None) -> None:
        """Run the known sample input at batch 1 and check the answer. Blocking."""
        ...

    def sample_inputs(self, batch: int) -> dict[str, np.ndarray[Any, Any]]:
        """The warm-up's inputs at ``batch`` items."""
        ...

    def close(self) -> None:
        """Let go of what it holds (processes, sessions); nothing runs it after."""
        ...
