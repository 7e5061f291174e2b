"""``meshserve gateway --processes N``: N gateway processes on one port.

Each process is a whole gateway (its own event loop, gateway id, reply list, router
watch and Redis connections) sharing nothing with the others but Redis and the port.
The port is opened with SO_REUSEPORT in each, and the kernel spreads new connections
over them by a hash of the connection's addresses: a gRPC channel (one connection)
stays on one process, many channels spread. A reply comes back to the process that
enqueued its request, as the request names that process's reply list.

The parent only supervises: it starts the processes (``spawn``: a fork would copy
gRPC's threads' state), forwards SIGHUP (tenants reload) and SIGTERM/SIGINT (drain)
to them, restarts one that dies after it had served a while, and stops them all when
one dies at start (a flag or the port is wrong: every restart would die too).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from meshserve.observe.logs import configure_logging
from meshserve.settings import GatewaySettings

log = logging.getLogger(__name__)

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
START_GRACE_S = 10.0
"""A process that exits sooner than this after its start failed to start: stop all."""
STOP_TIMEOUT_S = 60.0
"""Past the gateways' own drain (``--lame-duck-s`` + ``--drain-grace-s``), a process still running is killed."""

Serve = Callable[[GatewaySettings], None]
"""Runs one gateway in this process until SIGTERM/SIGINT (a module-level function: it is pickled by name)."""


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> float | None:
    """The container's CPU quota in cores (cgroup v2 ``cpu.max``: "<quota> <period>"),
    or None where there is none ("max") or no such file."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def default_processes(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """One per core this process may run on: the CPU affinity mask, capped by the
    container's CPU quota when it sets one (rounded up: 1.5 cores' quota, 2 processes)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit(cpu_max)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """What one process gets: its settings and how it logs."""

    index: int
    settings: GatewaySettings
    log_level: str
    log_format: str


def child_settings(settings: GatewaySettings, index: int) -> GatewaySettings:
    """Process ``index``'s settings: /metrics on ``metrics_port + index`` (each process
    has its own figures; a port cannot be shared by plain HTTP servers)."""
    metrics_port = settings.metrics_port + index if settings.metrics_port else 0
    return replace(settings, metrics_port=metrics_port)


def _child_main(serve: Serve, spec: ChildSpec) -> None:
    configure_logging(spec.log_level, spec.log_format, service=f"gateway[{spec.index}]")
    serve(spec.settings)


class _Group:
    def __init__(self, serve: Serve, settings: GatewaySettings, log_level: str, log_format: str) -> None:
        self._serve = serve
        self._settings = settings
        self._log = (log_level, log_format)
        self._context = multiprocessing.get_context("spawn")
        self.children: dict[int, tuple[BaseProcess, float]] = {}
        self.stopping = False
        self.failed = False

    def start(self, index: int) -> None:
        spec = ChildSpec(index, child_settings(self._settings, index), *self._log)
        process = self._context.Process(target=_child_main, args=(self._serve, spec), name=f"gateway-{index}")
        process.start()
        self.children[index] = (process, time.monotonic())

    def signal_all(self, signum: int) -> None:
        for process, _ in self.children.values():
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signum)

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.signal_all(signal.SIGTERM)

    def reap(self, sentinels: Collection[object]) -> None:
        """The processes whose sentinels are ready have exited: forget, restart or fail."""
        for index, (process, started) in list(self.children.items()):
            if process.sentinel not in sentinels:
                continue
            process.join()
            del self.children[index]
            if self.stopping:
                continue
            if time.monotonic() - started < START_GRACE_S:
                log.error("gateway process %d exited with %s at start: stopping the others", index, process.exitcode)
                self.failed = True
                self.stop()
            else:
                log.warning("gateway process %d exited with %s: starting it again", index, process.exitcode)
                self.start(index)


def run_processes(serve: Serve, settings: GatewaySettings, count: int, log_level: str, log_format: str) -> int:
    """Run ``count`` gateway processes until SIGTERM/SIGINT; the exit status (1 when
    a process failed at start)."""
    group = _Group(serve, settings, log_level, log_format)
    wake_read, wake_write = socket.socketpair()
    wake_write.setblocking(False)
    previous_fd = signal.set_wakeup_fd(wake_write.fileno())
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {signum: signal.signal(signum, lambda *_: None) for signum in handled}
    try:
        for index in range(count):
            group.start(index)
        log.info("%d gateway processes on port %d (SO_REUSEPORT)", count, settings.port)
        deadline: float | None = None
        while group.children:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([wake_read, *(p.sentinel for p, _ in group.children.values())], timeout)
            if wake_read in ready:
                for signum in wake_read.recv(64):
                    if signum == signal.SIGHUP:
                        group.signal_all(signal.SIGHUP)
                    elif signum in (signal.SIGTERM, signal.SIGINT):
                        group.stop()
            group.reap(ready)
            if group.stopping and deadline is None:
                deadline = time.monotonic() + STOP_TIMEOUT_S
            elif deadline is not None and time.monotonic() >= deadline:
                log.error("gateway processes still running %.0f s after SIGTERM: killing them", STOP_TIMEOUT_S)
                group.signal_all(signal.SIGKILL)
                deadline = time.monotonic() + STOP_TIMEOUT_S
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        wake_read.close()
        wake_write.close()
    return 1 if group.failed else 0
