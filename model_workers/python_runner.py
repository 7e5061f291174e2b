"""A Python model (config.yaml ``backend: python``): each instance a process of its own.

The worker starts ``info.instances`` processes (multiprocessing's spawn context,
``model_workers/python_child.py``), each running the version directory's model.py.
A batch goes to a free instance: its inputs are written into the instance's shared
input area, a small control message crosses the pipe, the child runs
``Model.execute`` on arrays read in place and lays its outputs into the shared output
area, and the worker copies them out (one copy in, one copy out; no pickled arrays).

A decoupled model (``decoupled: true``) streams: ``stream`` hands each response the
child yields to a callback as it comes (``model_workers/python_stream.py`` writes
them as partial replies), the output area reused response after response.

Failures stay with the batch that met them:

- an exception in ``execute`` answers that batch INTERNAL, naming the model and the
  Python exception type and message (``PythonModelError``; the traceback goes to the
  worker's log, never to the client);
- a process that dies mid-batch (a crash, ``os._exit``, the kernel's OOM killer)
  fails the batch UNAVAILABLE;
- a run stopped by the worker's watchdog (the execution timeout, or every request's
  deadline passed: ``model_workers/stops.py`` sets ``RunOptions.terminate``) kills
  the process with SIGKILL, and the compute pool answers the batch as it does for an
  ONNX model (UNAVAILABLE at the execution timeout).

A killed or dead instance is started afresh at once, on a thread of its own; a batch
arriving meanwhile waits for it (or takes another instance), and when the restart
fails the next run tries again and answers the failure. Other models, and other
instances of this one, are untouched. The model's time limits are the worker's: Python code cannot be
interrupted mid-call, so the stop is a kill.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np

from meshserve.errors import Unavailable
from meshserve.models.python_backend import ALLOW_FLAG
from meshserve.models.repository import ModelInfo
from meshserve.wire.dtypes import NUMPY_BY_KSERVE
from model_workers import python_child, warmup
from model_workers.engines import SPIN_OFF, EngineSetting, Trial
from model_workers.python_child import SharedArea, Spec

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0
"""How long a process may take to import model.py and run ``initialize`` (loading
weights or a tokenizer can take minutes; a hung one fails the load)."""
TERMINATE_CHECK_S = 0.01
"""While a batch runs, how often the waiting thread looks at the watchdog's stop flag
(``RunOptions.terminate``, the one signal the watchdog gives, which ONNX Runtime
itself reads between nodes). A reply ends the wait at once: this bounds only how late
a stop is."""
FIRST_AREA_BYTES = 1 << 20
STOP_GRACE_S = 5.0
"""How long ``close`` waits for ``finalize`` before it kills the process."""

_areas = count()


class PythonModelsNotAllowed(RuntimeError):
    """The worker was not started with ``--allow-python-models``: model.py is code, not data."""


class PythonModelError(RuntimeError):
    """model.py raised, or answered something other than its declared outputs.

    The message is ``<ExceptionType>: <first line>``; the runner answers it INTERNAL."""


Respond = Callable[[list[np.ndarray[Any, Any]]], bool]
"""A decoupled model's response (every declared output, for the whole batch) as it
comes; False stops the model (every caller went away). Called on the compute thread."""


class _Stopped(RuntimeError):
    """The watchdog stopped the run and the process was killed (the compute pool names the limit)."""


def refuse_unless_allowed(info: ModelInfo, allowed: bool) -> None:
    """Raise :class:`PythonModelsNotAllowed` naming the flag, unless the operator allowed Python models."""
    if not allowed:
        raise PythonModelsNotAllowed(
            f"model '{info.name}' is a Python model ({info.path.name} runs code from the model repository):"
            f" start the worker (or 'meshserve up') with {ALLOW_FLAG} to serve it"
        )


def _area_dir() -> str:
    """Where the shared areas live: tmpfs (/dev/shm) where there is one, else the temp directory."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


@dataclass(slots=True)
class _Instance:
    """One process of the model, its pipe and its two shared areas (None: not running)."""

    index: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    areas: dict[str, SharedArea] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)  # area paths the child has not mapped yet


class PythonModel:
    """A Python model held by a worker; the same surface as ``session.LoadedModel``."""

    may_run_inline = False  # a stop on the event loop's thread would kill the process

    def __init__(self, info: ModelInfo) -> None:
        """Nothing starts yet: ``warm_up`` starts the processes (in the loader thread)."""
        self.info = info
        self.ready = False
        self.engine = EngineSetting(1, SPIN_OFF)  # no ONNX Runtime threads: one process per instance
        self.engine_source = "python"
        self.engine_trials: tuple[Trial, ...] = ()
        self._context = multiprocessing.get_context("spawn")
        self._free: queue.SimpleQueue[_Instance] = queue.SimpleQueue()
        self._all = [_Instance(index) for index in range(info.instances)]
        self._warmup: warmup.WarmupInputs | None = None
        self._closed = False  # set by close: nothing restarts after
        self._restarts: list[threading.Thread] = []  # fresh processes being started (close waits for them)
        self._config: dict[str, Any] = {
            "model_name": info.name,
            "model_version": info.version,
            "model_repository": str(info.path.parent.parent),
            "version_dir": str(info.path.parent),
            "max_batch_size": info.max_batch_size,
            "decoupled": info.decoupled,
            "input": [{"name": t.name, "datatype": t.datatype, "dims": list(t.shape)} for t in info.inputs],
            "output": [{"name": t.name, "datatype": t.datatype, "dims": list(t.shape)} for t in info.outputs],
        }

    def warm_up(self) -> float:
        """Start every instance, then run the warm-up input at batch 1 (a failure there is only
        logged: model.py may need real data). Returns the seconds taken by the runs; raises
        when a process fails to start or ``initialize`` raises (a load failure)."""
        for instance in self._all:
            self._start(instance)
            self._free.put(instance)
        started = time.perf_counter()
        inputs = warmup.candidates(self.info)[0]
        try:
            self.run(inputs.feed(1, self.info.max_batch_size > 0))
            self._warmup = inputs
        except PythonModelError as exc:
            log.warning(
                "%s version %d: warm-up with %s failed (%s)", self.info.name, self.info.version, inputs.label, exc
            )
        self.ready = True
        return time.perf_counter() - started

    @property
    def warmed(self) -> bool:
        return self._warmup is not None

    def sample_inputs(self, batch: int) -> dict[str, np.ndarray[Any, Any]]:
        inputs = self._warmup or warmup.candidates(self.info)[0]
        return inputs.feed(batch, self.info.max_batch_size > 0)

    def compute_cpu_s(self) -> float | None:
        """None: the model computes in processes of its own, whose CPU is theirs."""
        return None

    def canary(self, options: Any = None) -> None:
        """Run the warm-up input at batch 1 (nothing when it did not run at warm-up)."""
        if self._warmup is not None:
            self.run(self.sample_inputs(1), options)

    def run(self, inputs: dict[str, np.ndarray[Any, Any]], options: Any = None) -> list[np.ndarray[Any, Any]]:
        """One batch on a free instance; outputs in the declared order. Blocking: call it
        on a compute thread. ``options``: the run's ``RunOptions``, whose ``terminate``
        (set by the watchdog) kills the process. A decoupled model answers its first
        response (then is stopped) or its final one (warm-up and the canary)."""
        if not self.info.decoupled:
            outputs = self.stream(inputs, options, None)
            assert outputs is not None
            return outputs
        first: list[list[np.ndarray[Any, Any]]] = []

        def keep_first(outputs: list[np.ndarray[Any, Any]]) -> bool:
            first.append(outputs)
            return False  # the first response is enough: the model's iterator is closed

        final = self.stream(inputs, options, keep_first)
        if first or final is not None:
            return first[0] if first else final  # type: ignore[return-value]
        raise PythonModelError(f"ValueError: model '{self.info.name}' answered no response")

    def stream(
        self, inputs: dict[str, np.ndarray[Any, Any]], options: Any, respond: Respond | None
    ) -> list[np.ndarray[Any, Any]] | None:
        """One batch on a free instance, as ``run``; a decoupled model's responses go to
        ``respond`` as they come, and its final outputs are returned (None: the final
        flag comes alone). Blocking: call it on a compute thread."""
        instance = self._free.get()  # the worker's semaphore (info.instances) means one is free or soon
        try:
            if instance.conn is None:  # its restart failed: try once more, in this run
                self._start(instance)
            return self._run_on(instance, inputs, options, respond)
        finally:
            if instance.conn is None and not self._closed:  # killed or crashed in this run
                restart = threading.Thread(target=self._restart, args=(instance,), name="python-model-restart")
                self._restarts = [t for t in self._restarts if t.is_alive()] + [restart]
                restart.start()
            else:
                self._free.put(instance)

    def _restart(self, instance: _Instance) -> None:
        """Start a fresh process for ``instance`` at once (not at the next batch), then free it.

        A failure leaves it dead for the next run to try again (and answer the error)."""
        try:
            self._start(instance)
        except Exception as exc:
            log.error(
                "%s version %d: restarting instance %d failed: %s",
                self.info.name,
                self.info.version,
                instance.index,
                exc,
            )
        finally:
            if self._closed:
                self._kill(instance)
            self._free.put(instance)

    def close(self) -> None:
        """Ask every process to finalize and exit; kill those still running after ``STOP_GRACE_S``."""
        self._closed = True
        for restart in self._restarts:  # a process starting now is killed by its thread, not raced here
            restart.join(STOP_GRACE_S)
        for instance in self._all:
            if instance.conn is not None:
                with contextlib.suppress(OSError):
                    instance.conn.send(("stop",))
        for instance in self._all:
            if instance.process is not None:
                instance.process.join(STOP_GRACE_S)
            self._kill(instance)

    # --- one instance ----------------------------------------------------------

    def _start(self, instance: _Instance) -> None:
        """Spawn the instance's process and wait for its ``initialize``; raises when it fails."""
        parent, child = self._context.Pipe()
        name = f"meshserve-python {self.info.name}/{self.info.version}#{instance.index}"
        config = {**self._config, "instance": instance.index}
        process = self._context.Process(
            target=python_child.main, args=(child, str(self.info.path), config), name=name, daemon=True
        )
        process.start()
        child.close()  # the child's end lives in the child alone: its death reads as EOF here
        instance.process, instance.conn = process, parent
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise TimeoutError(f"model.py did not initialize within {START_TIMEOUT_S:.0f} s")
            answer = parent.recv()
        except (EOFError, OSError, TimeoutError) as exc:
            self._kill(instance)
            raise Unavailable(
                f"model '{self.info.name}': its Python process ended before it was ready ({str(exc) or 'it exited'})"
            ) from exc
        if answer[0] != "ready":
            self._kill(instance)
            raise PythonModelError(f"{answer[1]}: {answer[2]} (in model.py's Model() or initialize)")
        self._ensure_area(instance, "in", FIRST_AREA_BYTES)
        self._ensure_area(instance, "out", FIRST_AREA_BYTES)
        log.info("%s started (pid %d)", name, process.pid)

    def _run_on(
        self, instance: _Instance, inputs: dict[str, np.ndarray[Any, Any]], options: Any, respond: Respond | None
    ) -> list[np.ndarray[Any, Any]] | None:
        assert instance.conn is not None
        arrays = list(inputs.items())
        self._ensure_area(instance, "in", python_child.needed_bytes(a for _, a in arrays))
        specs = instance.areas["in"].write(arrays)
        assert specs is not None
        paths = {
            role: instance.areas[role].path if instance.areas[role].path in instance.fresh else None
            for role in ("in", "out")
        }
        try:
            instance.conn.send(("run", paths["in"], paths["out"], specs))
            while (answer := self._wait(instance, options))[0] in ("grow", "part"):
                if answer[0] == "grow":
                    self._ensure_area(instance, "out", int(answer[1]))
                    instance.conn.send(("area", instance.areas["out"].path))
                    continue
                self._respond(instance, answer[1], inputs, respond)
        except (EOFError, OSError) as exc:
            process = instance.process
            self._kill(instance)  # joins it: its exit code is known after
            code = process.exitcode if process is not None else None
            raise Unavailable(
                f"model '{self.info.name}': its Python process exited during the batch (exit code {code});"
                " a fresh one is starting"
            ) from exc
        self._forget_fresh(instance)
        if answer[0] == "error":
            raise PythonModelError(f"{answer[1]}: {answer[2]}")
        return None if answer[1] is None else self._outputs(instance, answer[1], inputs)

    def _respond(
        self, instance: _Instance, specs: list[Spec], inputs: dict[str, np.ndarray[Any, Any]], respond: Respond | None
    ) -> None:
        """One streamed response: checked, handed to ``respond``, and the child told to go on or stop.

        Anything ``respond`` raises kills the process (it waits mid-stream) and goes up."""
        assert instance.conn is not None
        try:
            if respond is None:
                raise PythonModelError("TypeError: execute streamed responses but the model is not decoupled")
            more = respond(self._outputs(instance, specs, inputs))
        except BaseException:
            self._kill(instance)
            raise
        instance.conn.send(("next",) if more else ("close",))

    def _wait(self, instance: _Instance, options: Any) -> tuple[Any, ...]:
        """The child's next message; kills it and raises ``_Stopped`` once ``options.terminate`` is set."""
        assert instance.conn is not None
        while not instance.conn.poll(TERMINATE_CHECK_S):
            if options is not None and options.terminate:
                self._kill(instance)
                raise _Stopped(f"model '{self.info.name}': its Python process was killed mid-batch")
        answer: tuple[Any, ...] = instance.conn.recv()
        return answer

    def _outputs(
        self, instance: _Instance, specs: list[Spec], inputs: dict[str, np.ndarray[Any, Any]]
    ) -> list[np.ndarray[Any, Any]]:
        """The declared outputs, copied out of the shared area, each checked against config.yaml."""
        by_name = {spec[0]: spec for spec in specs}
        batch = next(iter(inputs.values())).shape[0] if self.info.max_batch_size and inputs else None
        outputs: list[np.ndarray[Any, Any]] = []
        for tensor in self.info.outputs:
            spec = by_name.get(tensor.name)
            if spec is None:
                raise PythonModelError(f"KeyError: execute returned no output '{tensor.name}' (got {sorted(by_name)})")
            array = instance.areas["out"].view(spec).copy()  # the area is the next batch's
            expected = NUMPY_BY_KSERVE[tensor.datatype]
            if array.dtype != expected:
                raise PythonModelError(
                    f"TypeError: output '{tensor.name}' is {array.dtype}, config.yaml declares {tensor.datatype}"
                )
            if batch is not None and array.shape[:1] != (batch,):
                raise PythonModelError(
                    f"ValueError: output '{tensor.name}' has {array.shape[:1]} rows for a batch of {batch}"
                )
            outputs.append(array)
        return outputs

    def _ensure_area(self, instance: _Instance, role: str, size_bytes: int) -> None:
        """A shared area of at least ``size_bytes`` for ``role``; a new one is sent with the next run."""
        current = instance.areas.get(role)
        if current is not None and current.size_bytes >= size_bytes:
            return
        size_bytes = max(size_bytes, 2 * current.size_bytes if current is not None else FIRST_AREA_BYTES)
        path = os.path.join(_area_dir(), f"meshserve-{os.getpid()}-{next(_areas)}")
        instance.areas[role] = SharedArea(path, mmap_pages(size_bytes))
        if current is not None:
            current.close()
            self._unlink(current.path)
        instance.fresh.append(path)

    def _forget_fresh(self, instance: _Instance) -> None:
        """The child mapped the new areas: their names can go (the memory stays while mapped)."""
        for path in instance.fresh:
            self._unlink(path)
        instance.fresh.clear()

    def _kill(self, instance: _Instance) -> None:
        """End the instance's process (SIGKILL when still running) and free its areas."""
        process, instance.process = instance.process, None
        if process is not None and process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGKILL)
        if process is not None:
            process.join(STOP_GRACE_S)
        if instance.conn is not None:
            instance.conn.close()
            instance.conn = None
        for area in list(instance.areas.values()):
            area.close()
        instance.areas.clear()
        self._forget_fresh(instance)

    @staticmethod
    def _unlink(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def mmap_pages(size_bytes: int) -> int:
    """``size_bytes`` rounded up to whole pages."""
    page = os.sysconf("SC_PAGE_SIZE")
    return (size_bytes + page - 1) // page * page
