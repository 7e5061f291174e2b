"""The meshserve command's small pieces that need no server."""

from __future__ import annotations

import asyncio
import gc
import io
import os
import signal
from pathlib import Path

import pytest

from meshserve.cli.main import _serve_until_signal, build_parser, main
from meshserve.tenancy.tenants import TenantRegistry, load_tenants


def test_hash_key_prints_what_the_tenants_file_accepts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert main(["hash-key", "-"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("sha256:")
    path = tmp_path / "tenants.yaml"
    path.write_text(f'tenants:\n  - name: a\n    api_keys: ["{line}"]\n    models: ["*"]\n')
    registry: TenantRegistry = load_tenants(path)
    assert registry.authenticate("s3cret") is not None
    assert registry.authenticate("s3cret\n") is None


def test_flags_default_to_meshserve_variables_and_win_over_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHSERVE_GRPC_PORT", "9101")
    monkeypatch.setenv("MESHSERVE_LEASE_MS", "750")
    parser = build_parser()
    gateway = parser.parse_args(["gateway"])
    worker = parser.parse_args(["worker", "--model-repository", "/m", "--lease-ms", "900"])
    assert gateway.grpc_port == 9101
    assert parser.parse_args(["worker", "--model-repository", "/m"]).lease_ms == 750
    assert worker.lease_ms == 900  # the flag wins over the variable


def test_trace_tenant_is_a_choice_on_gateway_and_worker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESHSERVE_TRACE_TENANT", "hash")
    parser = build_parser()
    assert parser.parse_args(["gateway"]).trace_tenant == "hash"
    assert parser.parse_args(["worker", "--model-repository", "/m", "--trace-tenant", "off"]).trace_tenant == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["gateway", "--trace-tenant", "plain"])
    assert "invalid choice: 'plain'" in capsys.readouterr().err


async def test_a_service_freezes_its_startup_heap_and_stops_on_sigterm() -> None:
    """Objects made during start-up are kept out of later full GC passes (their
    14-48 ms pauses set the p99), and SIGTERM leads to the service's stop."""
    events: list[str] = []
    frozen: list[int] = []

    async def start() -> None:
        events.append("start")
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)

    async def stop() -> None:
        events.append("stop")
        frozen.append(gc.get_freeze_count())

    try:
        async with asyncio.timeout(10):
            await _serve_until_signal(start, stop)
    finally:
        gc.unfreeze()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    assert events == ["start", "stop"]
    assert frozen[0] > 0
