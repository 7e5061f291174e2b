"""The meshserve command's small pieces that need no server."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from meshserve.cli import build_parser, main
from meshserve.tenants import TenantRegistry, load_tenants


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
