"""`meshserve up` as a user runs it: Ctrl-C in a terminal signals the whole
foreground process group, and the mesh must still drain in order."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from meshserve.devkit.redis_server import free_port
from tests.listening import listening_hosts, loopback_only

READY_TIMEOUT_S = 30  # about 2 s alone here; with the drain below, within the 60 s per-test timeout
DRAIN_TIMEOUT_S = 20


def test_ctrl_c_to_the_process_group_drains_before_redis_stops(model_repository: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "up.log"
    grpc_port = free_port()
    with log_path.open("w") as log:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshserve",
                "up",
                "--model-repository",
                str(model_repository),
                "--grpc-port",
                str(grpc_port),
                "--metrics-port",
                "0",
                # No --host and no --tenants: the open tenant, on loopback only.
                # Knobs up passes on: every child must take what it is given.
                *("--log-level", "INFO", "--lease-ms", "5000", "--max-message-bytes", str(8 * 1024 * 1024)),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,  # a process group of its own, like a terminal's foreground job
        )
        try:
            assert up.stdout is not None
            selector = selectors.DefaultSelector()
            selector.register(up.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + READY_TIMEOUT_S
            line = ""
            while "meshserve ready" not in line and selector.select(timeout=deadline - time.monotonic()):
                line = up.stdout.readline()
                assert line, f"meshserve up exited before it was ready:\n{log_path.read_text()}"
            assert "meshserve ready" in line
            assert f"at 127.0.0.1:{grpc_port}" in line
            assert "this machine only" in line
            assert loopback_only(grpc_port), listening_hosts(grpc_port)
            os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C does: every process in the group
            assert up.wait(timeout=DRAIN_TIMEOUT_S) == 0
        finally:
            if up.poll() is None:
                os.killpg(up.pid, signal.SIGKILL)
            up.wait()
            if up.stdout is not None:
                up.stdout.close()
    text = log_path.read_text()
    # Redis outlived every service's drain: nobody lost its connection on the way out.
    assert "Connection refused" not in text
    assert "redis unavailable" not in text
