"""The pure parts of ``meshserve bench --scenario noisy-neighbor``: tenants file, verdict, lines.

No servers and no timing: every figure here is given.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from meshserve.cli.main import build_parser
from meshserve.queue import TIERS
from meshserve.tenancy.tenants import load_tenants
from meshserve_bench import tenants as nn

CONFIG = nn.ScenarioConfig(
    model="cnn",
    duration_s=10.0,
    warmup_s=2.0,
    steady_rate_per_s=50.0,
    noisy_limit_per_s=40.0,
    flood_rate_per_s=400.0,
    flood_channels=8,
    json_path=None,
    repository=Path("/nonexistent"),
)
MACHINE = {"cores": 2, "platform": "Linux", "python": "3.11", "load_average_1m": 0.5}
ALONE = nn.PhaseFigures(
    name=nn.ALONE,
    duration_s=10.0,
    steady_ok=500,
    steady_p50_ms=2.0,
    steady_p99_ms=4.0,
    steady_errors={},
    steady_send_lag_p99_ms=0.5,
    flood_codes={},
    error_details={},
    client_cpu_s=0.5,
    flood_client_cpu_s=0.0,
    machine_busy_s=8.0,
)
FLOODED = replace(
    ALONE,
    name=nn.FLOODED,
    steady_p99_ms=5.0,
    flood_codes={"OK": 400, "RESOURCE_EXHAUSTED": 3600},
    client_cpu_s=0.6,
    flood_client_cpu_s=2.4,
    machine_busy_s=19.0,
)


def test_tenants_file_loads_with_hashed_keys_and_limits(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(nn.tenants_yaml("noisy-key", "steady-key", CONFIG))
    text = path.read_text()
    assert "noisy-key" not in text
    assert "steady-key" not in text
    registry = load_tenants(path)
    noisy, steady = registry.authenticate("noisy-key"), registry.authenticate("steady-key")
    assert noisy is not None
    assert steady is not None
    assert (noisy.name, noisy.rate_per_s, noisy.burst, noisy.tier) == ("noisy", 40.0, 40, TIERS["standard"])
    assert (steady.name, steady.rate_per_s, steady.tier) == ("steady", 500.0, TIERS["standard"])
    assert noisy.models == steady.models == ("cnn",)


def test_ratio_divides_flooded_p99_by_alone_p99() -> None:
    assert nn.p99_ratio(ALONE, FLOODED) == pytest.approx(1.25)
    assert nn.target_met(ALONE, FLOODED)


@pytest.mark.parametrize(
    "flooded",
    [
        replace(FLOODED, steady_p99_ms=6.5),
        replace(FLOODED, steady_errors={"UNAVAILABLE": 1}),
        replace(FLOODED, steady_p99_ms=math.nan),
    ],
)
def test_target_missed_on_slow_p99_any_error_or_no_figure(flooded: nn.PhaseFigures) -> None:
    assert not nn.target_met(ALONE, flooded)
    assert "target missed" in nn.format_report(CONFIG, MACHINE, ALONE, flooded)


def test_report_lines_with_given_figures() -> None:
    flooded = replace(
        FLOODED,
        flood_codes={"OK": 400, "RESOURCE_EXHAUSTED": 3600, "UNAVAILABLE": 2},
        error_details={"UNAVAILABLE": "model 'cnn' version 1 is not ready"},
    )
    lines = nn.format_report(CONFIG, MACHINE, ALONE, flooded).splitlines()
    assert lines[0] == "noisy-neighbor, model cnn, 10 s per phase, machine: 2 cores, load average 0.50 at start"
    assert lines[1] == (
        "tenant B (steady 50/s): alone p50 2.00 ms p99 4.00 ms, errors 0"
        " | under flood p50 2.00 ms p99 5.00 ms, errors 0 | p99 ratio 1.25x (target <= 1.5x)"
    )
    assert lines[2] == (
        "tenant A (limit 40/s, sending 400/s): accepted 400 (40.0/s), rejected 3600 (RESOURCE_EXHAUSTED),"
        " other UNAVAILABLE 2"
    )
    assert lines[3].startswith("cores: alone client cpu B 0.05 A 0.00, machine busy 0.80, B send lag p99 0.50 ms")
    assert lines[4] == "under flood: first UNAVAILABLE: model 'cnn' version 1 is not ready"
    assert lines[5] == "target met"


def test_report_splits_the_flood_into_a_tenants_share_and_the_refused_excess() -> None:
    at_limit = replace(ALONE, name=nn.AT_LIMIT, steady_p99_ms=4.4, flood_codes={"OK": 400})
    lines = nn.format_report(CONFIG, MACHINE, ALONE, FLOODED, at_limit).splitlines()
    assert lines[4] == (
        "reference: B beside A sending only its limit (40/s): A at its limit p50 2.00 ms p99 4.40 ms, errors 0"
        " | p99 ratio to alone 1.10x; the refused excess adds 1.14x on top"
    )
    report = nn.report_json(CONFIG, MACHINE, ALONE, FLOODED, at_limit)
    assert report["phases"]["at_limit"]["steady_p99_ms"] == pytest.approx(4.4)


def test_json_report_carries_both_phases_and_the_verdict() -> None:
    report = nn.report_json(CONFIG, MACHINE, ALONE, FLOODED)
    assert report["phases"]["flooded"]["flood_codes"] == {"OK": 400, "RESOURCE_EXHAUSTED": 3600}
    assert report["p99_ratio"] == pytest.approx(1.25)
    assert report["target_met"] is True


def test_flood_rate_defaults_to_ten_times_the_limit(tmp_path: Path) -> None:
    argv = ["bench", "--scenario", "noisy-neighbor", "--noisy-limit-per-s", "25", "--model-repository", str(tmp_path)]
    args = build_parser().parse_args(argv)
    config = nn.scenario_config(args)
    assert config.flood_rate_per_s == pytest.approx(250.0)
    assert config.steady_rate_per_s == pytest.approx(50.0)
    assert config.repository == tmp_path


def test_scenario_refuses_a_target() -> None:
    args = build_parser().parse_args(["bench", "--scenario", "noisy-neighbor", "--target", "127.0.0.1:8001"])
    with pytest.raises(SystemExit, match="starts its own mesh"):
        nn.scenario_config(args)
