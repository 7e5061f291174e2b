"""The process one instance of a Python model runs in (``model_workers/python_runner.py`` starts it).

Imports the version directory's model.py, builds its ``Model``, calls
``initialize(config)``, then serves the worker over a pipe until told to stop or
killed. The pipe carries small control tuples only; tensors lie in two files mapped
by both processes (an input area and an output area, ``SharedArea``), so a batch's
arrays are written once and read in place, never pickled.

Messages, worker to child: ``("run", input_path | None, output_path | None, specs)``
(a path only when that area was replaced by a larger one) and ``("stop",)``. Child
to worker: ``("ready",)`` or ``("failed", type, message)`` after initialize;
``("ok", specs)``, ``("grow", bytes)`` (the outputs need a larger output area: the
worker answers with ``("area", path)``) or ``("error", type, message)`` after a run.
A spec is ``(name, numpy dtype str, shape, offset)``.

A decoupled model (``config["decoupled"]``) streams: ``execute`` returns an iterator
(a generator) of output dicts. Each one is laid into the output area and announced
with ``("part", specs)``; the worker copies it out and answers ``("next",)`` to go on
or ``("close",)`` to stop (every caller went away): the iterator's ``close`` runs and
the run ends ``("ok", None)``. When the iterator ends, ``("ok", specs)`` carries the
generator's ``return`` value when it returned a dict (the last response, flagged
final), else ``("ok", None)`` (the final flag comes alone).

Imports nothing of meshserve beyond the standard library and numpy: the process
starts faster, and model.py sees a plain interpreter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import mmap
import os
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

Spec = tuple[str, str, tuple[int, ...], int]
ALIGN_BYTES = 64  # each tensor starts on a cache line


class SharedArea:
    """A file mapped into memory, holding a batch's tensors at aligned offsets."""

    def __init__(self, path: str, size_bytes: int = 0) -> None:
        """Map ``path``; with ``size_bytes`` create it that large first (the worker's side)."""
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if size_bytes else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if size_bytes:
                os.ftruncate(fd, size_bytes)
            self.size_bytes = os.fstat(fd).st_size
            self.map = mmap.mmap(fd, self.size_bytes)
        finally:
            os.close(fd)  # the mapping keeps the memory; the path may go once both sides mapped it

    def write(self, arrays: list[tuple[str, np.ndarray[Any, Any]]]) -> list[Spec] | None:
        """Lay ``arrays`` out from offset 0; None when they do not fit (nothing written)."""
        if needed_bytes(arr for _, arr in arrays) > self.size_bytes:
            return None
        specs: list[Spec] = []
        offset = 0
        for name, array in arrays:
            view: np.ndarray[Any, Any] = np.ndarray(array.shape, array.dtype, buffer=self.map, offset=offset)
            view[...] = array
            specs.append((name, array.dtype.str, tuple(array.shape), offset))
            offset += _aligned(array.nbytes)
        return specs

    def view(self, spec: Spec) -> np.ndarray[Any, Any]:
        """The tensor ``spec`` names, in place (valid until the area is written again)."""
        _, dtype, shape, offset = spec
        return np.ndarray(shape, np.dtype(dtype), buffer=self.map, offset=offset)

    def close(self) -> None:
        # BufferError: an array still views it (model.py kept an input); freed with that array
        with contextlib.suppress(BufferError):
            self.map.close()


def needed_bytes(arrays: Any) -> int:
    """Bytes an area needs for ``arrays`` laid out at aligned offsets."""
    return sum(_aligned(array.nbytes) for array in arrays)


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def main(conn: Connection, model_path: str, config: dict[str, Any]) -> None:
    """The child's whole life: load, answer runs, finalize on ``stop`` (entry point of the process)."""
    try:
        model = _load(Path(model_path), config)
    except BaseException as exc:
        traceback.print_exc()
        conn.send(("failed", type(exc).__name__, _first_line(exc)))
        return
    conn.send(("ready",))
    areas: dict[str, SharedArea] = {}
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the worker is gone
            return
        if message[0] == "stop":
            finalize = getattr(model, "finalize", None)
            if finalize is not None:
                finalize()
            return
        _, input_path, output_path, specs = message
        for role, path in (("in", input_path), ("out", output_path)):
            if path is not None:
                if role in areas:
                    areas[role].close()
                areas[role] = SharedArea(path)
        conn.send(_run(model, conn, areas, specs, bool(config.get("decoupled"))))


def _load(path: Path, config: dict[str, Any]) -> Any:
    """model.py's ``Model``, built and initialized; its directory is importable (helpers beside it)."""
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("model", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules["model"] = module
    spec.loader.exec_module(module)
    model_class = getattr(module, "Model", None)
    if model_class is None:
        raise AttributeError(f"{path} defines no class Model")
    model = model_class()
    initialize = getattr(model, "initialize", None)
    if initialize is not None:
        initialize(config)
    return model


def _run(
    model: Any, conn: Connection, areas: dict[str, SharedArea], specs: list[Spec], decoupled: bool
) -> tuple[Any, ...]:
    """One batch: model.execute on in-place inputs, outputs laid into the output area."""
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for spec in specs:
        array = areas["in"].view(spec)
        array.flags.writeable = False  # the worker's buffer: a model that needs to change it copies
        inputs[spec[0]] = array
    try:
        result = model.execute(inputs)
        if decoupled and not isinstance(result, dict):
            return _stream(iter(result), conn, areas)
        if not isinstance(result, dict):
            hint = " (a model that yields many responses needs 'decoupled: true')" if hasattr(result, "send") else ""
            raise TypeError(f"execute returned {type(result).__name__}, not a dict of output name to array{hint}")
        outputs = _arrays(result)
    except BaseException as exc:
        traceback.print_exc()  # the worker's log has the traceback; the client gets type and message
        return ("error", type(exc).__name__, _first_line(exc))
    return ("ok", _lay_out(outputs, conn, areas))


def _stream(responses: Any, conn: Connection, areas: dict[str, SharedArea]) -> tuple[Any, ...]:
    """A decoupled model's responses, one ``part`` each, the worker's answer awaited between."""
    try:
        while True:
            try:
                result = next(responses)
            except StopIteration as end:
                last = end.value
                return ("ok", None if last is None else _lay_out(_arrays(last), conn, areas))
            conn.send(("part", _lay_out(_arrays(result), conn, areas)))
            if conn.recv()[0] == "close":
                close = getattr(responses, "close", None)
                if close is not None:
                    close()
                return ("ok", None)
    except BaseException as exc:
        traceback.print_exc()
        return ("error", type(exc).__name__, _first_line(exc))


def _arrays(result: Any) -> list[tuple[str, np.ndarray[Any, Any]]]:
    """An answer's outputs as contiguous arrays; TypeError when it is not a dict of fixed-size arrays."""
    if not isinstance(result, dict):
        raise TypeError(f"a response is {type(result).__name__}, not a dict of output name to array")
    outputs = [(str(name), np.ascontiguousarray(value)) for name, value in result.items()]
    for name, array in outputs:
        if array.dtype.hasobject:
            raise TypeError(f"output '{name}' is an object array; Python models answer fixed-size tensors")
    return outputs


def _lay_out(
    outputs: list[tuple[str, np.ndarray[Any, Any]]], conn: Connection, areas: dict[str, SharedArea]
) -> list[Spec]:
    """``outputs`` written into the output area (a larger one asked for when they do not fit)."""
    written = areas["out"].write(outputs)
    if written is None:
        conn.send(("grow", needed_bytes(arr for _, arr in outputs)))
        message = conn.recv()
        areas["out"].close()
        areas["out"] = SharedArea(message[1])
        written = areas["out"].write(outputs)
        assert written is not None
    return written


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""
