"""One loaded model: an ONNX Runtime session, its warm-up, and batched runs.

On a GPU the session is built with the providers ``engines.provider_chain`` picks
(TensorRT, CUDA, CPU by default). When the best one fails to build the session or to
warm it up, it is dropped with a warning and the next one is tried, down to the CPU;
:attr:`LoadedModel.providers` says what the session ended up using.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from meshserve.models.repository import ModelInfo
from model_workers import engines, warmup
from model_workers.cpu_time import ComputeCpu
from model_workers.sequences import with_hidden_defaults

log = logging.getLogger(__name__)


class SanityCheckFailed(RuntimeError):
    """A model ran but its answer to the known sample input is wrong (shape, NaN, Inf)."""


class EngineUnavailable(RuntimeError):
    """ONNX Runtime built the session without the provider it was asked to use first."""


DEFAULT_ENGINE = engines.EngineSetting()


def _session_options(engine: engines.EngineSetting) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # ONNX Runtime's threads spin between runs by default. On a host shared with a
    # gateway, Redis and other workers that spin takes the CPU they need, so it is
    # on only where a model's trials (model_workers/tuning.py) or its config say so.
    engine.apply(options)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class InferenceSession(Protocol):
    def run(
        self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any], run_options: Any = None
    ) -> list[Any]: ...


class LoadedModel:
    """A model held by a worker. ``ready`` only after load, warm-up and a sanity check."""

    may_run_inline = True  # a quick model's batches may run on the event loop's thread (served.py)

    def __init__(
        self,
        info: ModelInfo,
        *,
        device: str = "cpu",
        engine: engines.EngineSetting = DEFAULT_ENGINE,
        available: Sequence[str] | None = None,
    ) -> None:
        """Build the session for ``device`` ("cpu", "cuda:N" or a MIG UUID).

        ``engine``: ONNX Runtime's thread pool settings; the default lets idle threads
        sleep (``model_workers.tuning`` measures which setting a model runs fastest on).
        ``available`` stands in for ``ort.get_available_providers()`` (tests only).
        Blocking: a TensorRT engine build can take minutes the first time.
        """
        self.info = info
        self.device = device
        self.engine = engine
        self.engine_source = "default"  # how ``engine`` was chosen: measured, config.yaml, flags, default
        self.engine_trials: tuple[engines.Trial, ...] = ()  # the timings it was chosen by
        self._options = _session_options(engine)
        self._cpu = ComputeCpu()
        if available is None:
            available = ort.get_available_providers()
        self._chain = engines.provider_chain(info.execution, device, available, info)
        self.output_names = [t.name for t in info.outputs]
        self.providers: tuple[str, ...] = ()
        self._bound: Any = None  # the session when runs go through IO binding (GPU only)
        self.session: InferenceSession = self._open()
        log.info("%s version %d on %s runs on %s", info.name, info.version, device, ", ".join(self.providers))
        self.ready = False
        self._canary_feed: dict[str, np.ndarray[Any, Any]] | None = None
        self._warmup: warmup.WarmupInputs | None = None  # what warm-up ran; None: not warmed

    @property
    def on_cpu(self) -> bool:
        """Whether the session runs on ONNX Runtime's CPU provider alone (thread settings matter)."""
        return self.providers == (engines.CPU,)

    def close(self) -> None:
        """Nothing to end: the session goes with the last reference to it."""

    def use_engine(self, engine: engines.EngineSetting) -> None:
        """Rebuild the session under ``engine``; only before the model is served
        (nothing may run it meanwhile). Blocking, like the constructor."""
        if engine == self.engine:
            return
        self.engine = engine
        self._options = _session_options(engine)
        self.session = self._open()

    def run(
        self, inputs: dict[str, np.ndarray[Any, Any]], options: ort.RunOptions | None = None
    ) -> list[np.ndarray[Any, Any]]:
        """Run one batch; returns every output, in the model's output order.

        ``options``: the run's own, whose ``terminate`` another thread may set to stop it.
        A stateful model's feed without its state or control inputs (a warm-up's, a
        canary's) gets their initial values."""
        if self.info.sequence is not None:
            inputs = with_hidden_defaults(self.info.sequence, inputs, self.info.max_batch_size > 0)
        started_s = time.thread_time()
        try:
            if self._bound is not None:
                return self._run_bound(inputs, options)
            return [np.asarray(out) for out in self.session.run(self.output_names, inputs, options)]
        finally:
            self._cpu.ran(time.thread_time() - started_s)

    def compute_cpu_s(self) -> float:
        """CPU seconds spent computing so far (warm-up and trials included): the calling
        threads' inside ``run`` and every one of the session's pool threads'
        (``model_workers/cpu_time.py``)."""
        return self._cpu.seconds()

    @property
    def pool_threads(self) -> frozenset[int]:
        """The native thread ids of the session's intra-op pool (none with one thread)."""
        return self._cpu.pool_threads

    @property
    def io_bound(self) -> bool:
        """Whether runs go through IO binding (``_run_bound``): a GPU session without BYTES tensors."""
        return self._bound is not None

    def _run_bound(
        self, inputs: dict[str, np.ndarray[Any, Any]], options: ort.RunOptions | None
    ) -> list[np.ndarray[Any, Any]]:
        """Run on the GPU through IO binding: one copy in and one copy out per tensor.

        Inputs are bound in host memory and ONNX Runtime copies each to the device once.
        Outputs stay on the device and ``copy_outputs_to_cpu`` copies each once into a
        new numpy array; binding them to "cpu" instead costs two copies (device to an
        ONNX Runtime host buffer, then into numpy), as a plain ``run`` does. A binding
        per run: batches may run on several executor threads.
        """
        binding = self._bound.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self._bound.run_with_iobinding(binding, options)
        outputs: list[np.ndarray[Any, Any]] = binding.copy_outputs_to_cpu()
        return outputs

    def _open(self) -> Any:
        """The session on the best provider of the chain that builds."""
        while True:
            try:
                return self._create()
            except Exception as exc:
                if not self._fall_back(exc):
                    raise

    def _create(self) -> Any:
        best, best_options = self._chain[0]
        if best == engines.TENSORRT:
            Path(best_options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        session = self._cpu.build(
            lambda: ort.InferenceSession(
                str(self.info.path),
                sess_options=self._options,
                providers=[name for name, _ in self._chain],
                provider_options=[opts for _, opts in self._chain],
                # ONNX Runtime's Python layer has its own fallback, which drops our provider
                # options (memory limit) and may switch providers mid-serving: ours only.
                enable_fallback=0,
            )
        )
        session.disable_fallback()  # the keyword above is newer than some ONNX Runtimes we accept
        providers = tuple(session.get_providers())
        if best not in providers:
            # A provider whose libraries fail to load can be skipped with only a log line.
            raise EngineUnavailable(f"ONNX Runtime built the session on {', '.join(providers)} instead")
        self.providers = providers
        on_gpu = not engines.GPU_PROVIDERS.isdisjoint(providers)
        has_bytes = any(t.datatype == "BYTES" for t in (*self.info.inputs, *self.info.outputs))
        self._bound = session if on_gpu and not has_bytes else None
        return session

    def _fall_back(self, exc: Exception) -> bool:
        """Drop the chain's best provider after ``exc``; False when only the CPU was left."""
        failed = self._chain[0][0]
        if failed == engines.CPU:
            return False
        self._chain = self._chain[1:]
        log.warning(
            "%s version %d: %s failed on %s (%s: %s); falling back to %s",
            self.info.name,
            self.info.version,
            failed,
            self.device,
            type(exc).__name__,
            exc,
            self._chain[0][0],
        )
        return True

    def warm_up(self) -> float:
        """Run the warm-up inputs (``model_workers/warmup.py``) at batch 1 and at max
        batch; check outputs are sane.

        Returns the warm-up time in seconds. Inputs from the config or from the
        graph's fixed shapes must run: otherwise this raises :class:`SanityCheckFailed`
        (wrong batch size, NaN or infinite floats) or whatever ONNX Runtime raises,
        and such a model never reports ready. Guessed sizes for symbolic dims are
        tried in turn; when none runs, the model is ready without warm-up (one
        WARNING, ``warmed`` stays False and the canary has no input to run). On a
        GPU provider a failure first drops that provider, rebuilds the session on
        the next one (with a warning) and warms up again.
        """
        started = time.perf_counter()
        while True:
            try:
                self._warmup = self._warm_up_once()
                break
            except Exception as exc:
                # e.g. a TensorRT engine that builds but answers Inf in fp16: try the next provider
                if not self._fall_back(exc):
                    raise
                self.session = self._open()
        self.ready = True
        return time.perf_counter() - started

    @property
    def warmed(self) -> bool:
        """Whether warm-up ran an input (False: ready without warm-up, no guess fitted)."""
        return self._warmup is not None

    def _warm_up_once(self) -> warmup.WarmupInputs | None:
        """The inputs the warm-up ran; None when only guesses were possible and none ran."""
        options = warmup.candidates(self.info)
        if not options[0].guessed:
            for inputs in options:  # the config's samples, or the graph's shapes: each must run
                self._run_sizes(inputs)
            return options[0]
        tried: list[tuple[warmup.WarmupInputs, str]] = []
        for inputs in options:
            try:
                self._check(self.run(inputs.feed(1, self.info.max_batch_size > 0)), 1)
            # A guess that does not fit (a Reshape, a Concat of strides) says nothing of the model.
            except Exception as exc:
                log.debug(
                    "%s version %d: warm-up with %s failed: %s", self.info.name, self.info.version, inputs.label, exc
                )
                tried.append((inputs, f"{type(exc).__name__}: {exc}"))
                continue
            log.info("%s version %d: warm-up with %s", self.info.name, self.info.version, inputs.label)
            try:
                self._run_sizes(inputs)
            except Exception as exc:  # a guessed size too big at max batch: ready all the same
                log.warning(
                    "%s version %d: warm-up at max batch with %s failed (%s: %s); serving it warmed at batch 1",
                    self.info.name,
                    self.info.version,
                    inputs.label,
                    type(exc).__name__,
                    exc,
                )
            return inputs
        log.warning(warmup.no_fit_warning(self.info, [(i, why.splitlines()[0]) for i, why in tried]))
        return None

    def _run_sizes(self, inputs: warmup.WarmupInputs) -> None:
        """Run ``inputs`` at batch 1, at the max batch and at its own batch size; check each."""
        batching = self.info.max_batch_size > 0
        sizes = {1, self.info.max_batch_size, inputs.batch_size or 1} if batching else {1}
        for batch in sorted(sizes):
            self._check(self.run(inputs.feed(batch, batching)), batch)

    def canary(self, options: ort.RunOptions | None = None) -> None:
        """Run the known sample input at batch 1 and check the answer, as warm-up does
        (nothing when the model is served without warm-up: no input is known to fit).

        Blocking (runs the model): call it in the worker's executor. Raises like
        ``warm_up``; leaves ``ready`` to the caller, which owns the model's health.
        """
        if self._warmup is None:
            return  # served without warm-up: no input is known to fit
        if self._canary_feed is None:
            self._canary_feed = self.sample_inputs(1)
        self._check(self.run(self._canary_feed, options), 1)

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
        """The warm-up's inputs at ``batch`` items (the canary's at batch 1).

        Before warm-up, or when no guess fitted, the first candidate's (for a model
        with symbolic dims, a guess that may not run)."""
        inputs = self._warmup or warmup.candidates(self.info)[0]
        return inputs.feed(batch, self.info.max_batch_size > 0)
