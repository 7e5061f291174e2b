"""The pure parts of ``meshserve bench``: flags, inputs, the window's count, percentiles,
the overload and noisy-neighbour verdicts, and the report made from a run's JSON.

No servers and no timing, except one test that runs a real example model through the
worker's session class and checks only that it ran.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshserve.cli.main import build_parser
from meshserve.models.repository import ModelInfo, TensorInfo, load_model
from meshserve.queue import TIERS
from meshserve.tenancy.tenants import load_tenants
from meshserve_bench import cli, report, scenarios, storm, tenants
from meshserve_bench.config import BenchConfig
from meshserve_bench.load import (
    CallFigures,
    LoadPoint,
    Tally,
    Window,
    build_request,
    due_times_ns,
    percentile_ms,
    random_inputs,
)
from meshserve_bench.raw import RawFigures, interleaved_idle_runs_ns, raw_batches, worker_session
from meshserve_bench.redis_cost import RedisUsage

MS = 1_000_000  # ns
RAW = RawFigures(1.0, 1.5, {1: 1000.0, 8: 1600.0, 32: 2000.0}, 2.25, 2.0, 2.2, "threads=1,spin=off, measured", 0.1)
CONFIG = BenchConfig(
    scenario="sweep", target=None, model="cnn", repository=Path("/nonexistent"), duration_s=10.0, warmup_s=2.0
)


def _model(shape: tuple[int, ...], max_batch_size: int, datatype: str = "FP32") -> ModelInfo:
    return ModelInfo(
        name="m",
        version=3,
        path=Path("/nonexistent/model.onnx"),
        inputs=(TensorInfo("x", datatype, shape),),
        outputs=(TensorInfo("y", "FP32", (-1, 10)),),
        max_batch_size=max_batch_size,
        max_queue_delay_us=0,
        preferred_batch_sizes=(),
        max_queue_size=0,
    )


def _calls(ok: int, p50_ms: float, p99_ms: float, errors: dict[str, int] | None = None) -> CallFigures:
    return CallFigures(ok, p50_ms, p99_ms, errors or {}, 2000.0 if errors else math.nan, {})


def _point(offered: float, calls: CallFigures, redis: RedisUsage | None = None, cpu_s: float = 1.0) -> LoadPoint:
    return LoadPoint(offered, 8, 10.0, calls, int(offered * 10), 0.5, cpu_s, 8.0, redis)


def test_percentile_interpolates_and_converts_ns_to_ms() -> None:
    assert percentile_ms([1 * MS, 2 * MS, 3 * MS, 4 * MS], 50) == pytest.approx(2.5)
    assert percentile_ms([7 * MS], 99) == pytest.approx(7.0)
    assert math.isnan(percentile_ms([], 50))


def test_raw_best_batch_and_batches_tried() -> None:
    assert (RAW.best_batch(), RAW.best_items_per_s()) == (32, 2000.0)
    assert raw_batches(32) == [1, 8, 32]
    assert raw_batches(8) == [1, 8]
    assert raw_batches(1) == [1]


def test_inputs_fill_batch_and_symbolic_dims_and_keep_a_fixed_dim_0() -> None:
    arrays = random_inputs(_model((-1, 3, -1), max_batch_size=32), batch=4)
    assert (arrays["x"].shape, arrays["x"].dtype) == ((4, 3, 32), np.float32)
    fixed = random_inputs(_model((1, 4), max_batch_size=0, datatype="INT64"), batch=8)
    assert (fixed["x"].shape, fixed["x"].dtype) == ((1, 4), np.int64)
    request = build_request(_model((-1, 3, 2, 2), max_batch_size=32))
    assert (request.model_name, request.model_version, list(request.inputs[0].shape)) == ("m", "3", [1, 3, 2, 2])
    assert len(request.raw_input_contents[0]) == 12 * 4


def test_only_calls_ending_inside_the_window_count() -> None:
    tally = Tally(Window(100 * MS, 200 * MS))
    tally.record("OK", "", 90 * MS, 110 * MS)
    tally.record("OK", "", 150 * MS, 210 * MS)  # ends after the window
    tally.record("OK", "", 0, 99 * MS)  # ends before it
    tally.record("UNAVAILABLE", "no worker", 120 * MS, 125 * MS)
    tally.record("UNAVAILABLE", "later details", 120 * MS, 130 * MS)
    figures = tally.figures()
    assert (figures.ok, figures.p50_ms, figures.errors) == (1, pytest.approx(20.0), {"UNAVAILABLE": 2})
    assert figures.error_p50_ms == pytest.approx(7.5)
    assert figures.error_details == {"UNAVAILABLE": "no worker"}


def test_schedule_is_uniform_from_the_first_send_and_stops_before_the_end() -> None:
    assert list(due_times_ns(0, 4.0, 1000 * MS)) == [0, 250 * MS, 500 * MS, 750 * MS]
    times = list(due_times_ns(7, 3.0, 10_000_000_007))
    assert (len(times), times[-1]) == (30, 7 + round(29 * 1e9 / 3.0))  # from the first, not summed steps


@pytest.mark.parametrize("text", ["", "0", "1,x", "4,-1", "nan"])
def test_lists_reject_bad_values(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.positive_list(float)(text)


def test_flags_build_the_config(tmp_path: Path) -> None:
    argv = ["bench", "--scenario", "open-loop", "--rates", "50,100.5", "--concurrency", "1,8"]
    args = build_parser().parse_args([*argv, "--noisy-limit-per-s", "25", "--model-repository", str(tmp_path)])
    config = cli.config_from_args(args)
    assert (config.scenario, config.rates_per_s, config.concurrencies) == ("open-loop", (50.0, 100.5), (1, 8))
    assert (config.flood_rate_per_s, config.repository, config.redis_url) == (250.0, tmp_path, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--concurrency", "1,0"])


def test_noisy_neighbor_refuses_a_target() -> None:
    with pytest.raises(SystemExit, match="starts its own mesh"):
        tenants.run_noisy_neighbor(replace(CONFIG, scenario="noisy-neighbor", target="127.0.0.1:1"))


def test_a_point_beside_raw_and_per_call_to_redis() -> None:
    point = _point(32, _calls(9990, 3.0, 5.5, {"UNAVAILABLE": 10}), RedisUsage(commands=400_000, cpu_s=2.5))
    figures = scenarios.point_json(point, RAW)
    assert figures["throughput_ratio"] == pytest.approx(0.4995)  # 999 ok/s over 2000 items/s at batch 32
    assert (figures["added_p50_ms"], figures["added_p99_ms"]) == (pytest.approx(2.0), pytest.approx(4.0))
    assert figures["redis_commands_per_call"] == pytest.approx(40.0)  # the failed calls count too
    assert figures["redis_cpu_us_per_call"] == pytest.approx(250.0)
    assert figures["redis_core_calls_per_s"] == pytest.approx(4000.0)


OVERLOAD = scenarios.OverloadFigures(
    sustainable_per_s=400.0,
    probe_duration_s=3.0,
    deadline_ms=2000.0,
    load=_point(800.0, _calls(4000, 80.0, 150.0, {"RESOURCE_EXHAUSTED": 3900, "DEADLINE_EXCEEDED": 100})),
    rss_start_kib=400 * 1024,
    rss_end_kib=410 * 1024,
)


def test_overload_met_when_bounded_shed_and_flat() -> None:
    assert scenarios.overload_problems(OVERLOAD) == []
    assert OVERLOAD.shed() == {"RESOURCE_EXHAUSTED": 3900, "DEADLINE_EXCEEDED": 100, "other": 0}
    assert scenarios.overload_problems(replace(OVERLOAD, rss_start_kib=None, rss_end_kib=None)) == []
    figures = scenarios.overload_json(OVERLOAD)
    assert (figures["target_met"], figures["rss_growth"]) == (True, pytest.approx(0.025))


@pytest.mark.parametrize(
    ("figures", "problem"),
    [
        (replace(OVERLOAD, load=_point(800.0, _calls(4000, 80.0, 2500.0))), "past the 2000 ms deadline"),
        (replace(OVERLOAD, load=_point(800.0, _calls(0, math.nan, math.nan))), "no call was accepted"),
        (replace(OVERLOAD, load=_point(800.0, _calls(10, 1.0, 2.0, {"INTERNAL": 3}))), "3 calls failed with codes"),
        (replace(OVERLOAD, rss_end_kib=500 * 1024), "mesh RSS grew 25%"),
    ],
)
def test_overload_missed(figures: scenarios.OverloadFigures, problem: str) -> None:
    assert any(problem in text for text in scenarios.overload_problems(figures))
    assert scenarios.overload_json(figures)["target_met"] is False


def test_an_overload_miss_names_a_client_that_lagged_behind_its_schedule() -> None:
    late = _point(800.0, _calls(4000, 80.0, 2500.0))
    on_time = scenarios.overload_problems(replace(OVERLOAD, load=late))
    lagging = scenarios.overload_problems(replace(OVERLOAD, load=replace(late, send_lag_p99_ms=750.0)))
    assert not any("send lag" in text for text in on_time)
    assert any("past the 2000 ms deadline" in text and "send lag p99 750 ms" in text for text in lagging)


def _phase(name: str, p99_ms: float, errors: dict[str, int] | None = None) -> tenants.PhaseFigures:
    return tenants.PhaseFigures(name, 0.0, _point(50.0, _calls(500, 2.0, p99_ms, errors), cpu_s=0.5), None)


@pytest.mark.parametrize(
    ("flooded", "met"),
    [
        (_phase(tenants.FLOODED, 5.0), True),
        (_phase(tenants.FLOODED, 6.5), False),
        (_phase(tenants.FLOODED, 5.0, {"UNAVAILABLE": 1}), False),
        (_phase(tenants.FLOODED, math.nan), False),
    ],
)
def test_noisy_neighbor_target_on_p99_ratio_and_errors(flooded: tenants.PhaseFigures, met: bool) -> None:
    alone, at_limit = _phase(tenants.ALONE, 4.0), _phase(tenants.AT_LIMIT, 4.4)
    figures = tenants.noisy_neighbor_json([alone, at_limit, flooded])
    assert figures["target_met"] is met
    assert figures["at_limit_p99_ratio"] == pytest.approx(1.1)
    assert tenants.p99_ratio(alone, _phase(tenants.FLOODED, 5.0)) == pytest.approx(1.25)


def _storm(p99_ms: float, b_errors: dict[str, int] | None = None, gateway_cpu_s: float = 3.0) -> tenants.PhaseFigures:
    """A storm phase: B's calls, and A's 400 OK and 10 000 refused in the 10 s window."""
    a_calls = _point(0.0, _calls(400, 1.0, 2.0, {"RESOURCE_EXHAUSTED": 10_000}))
    b_calls = _point(40.0, _calls(400, 2.0, p99_ms, b_errors))
    return tenants.PhaseFigures(storm.STORM, 0.0, b_calls, a_calls, gateway_cpu_s)


@pytest.mark.parametrize(
    ("storm_phase", "met"),
    [
        (_storm(8.0), True),  # exactly 2x
        (_storm(8.1), False),
        (_storm(5.0, {"DEADLINE_EXCEEDED": 1}), False),
        (_storm(math.nan), False),  # no OK call for B
    ],
)
def test_retry_storm_target_on_p99_within_2x_and_no_error(storm_phase: tenants.PhaseFigures, met: bool) -> None:
    alone = tenants.PhaseFigures(tenants.ALONE, 0.0, _point(40.0, _calls(400, 2.0, 4.0)), None, 0.4)
    figures = storm.retry_storm_json([alone, storm_phase])
    assert figures["target_met"] is met
    assert figures["a_refused_per_s"] == pytest.approx(1000.0)
    # 3.0 s of gateway CPU, less 800 admitted calls at the alone phase's 1 ms each, over 10 000 refusals
    assert figures["gateway_cpu_per_refusal_ms"] == pytest.approx(0.22)
    unread = tenants.PhaseFigures(storm.STORM, 0.0, storm_phase.steady, storm_phase.flood, None)
    assert math.isnan(storm.retry_storm_json([alone, unread])["gateway_cpu_per_refusal_ms"])
    lines = report.markdown(
        _result(scenario="retry-storm", raw=None, points=[], settings=asdict(CONFIG), **figures)
    ).splitlines()
    assert any(line.startswith("**target met**" if met else "**target missed**") for line in lines)
    assert "- A: 48 connections, each retrying 20 ms after a refusal: 1000 refusals/s" in lines


def test_tenants_file_loads_with_hashed_keys_and_limits(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(tenants.tenants_yaml("noisy-key", "steady-key", CONFIG))
    assert "noisy-key" not in path.read_text()
    registry = load_tenants(path)
    noisy, steady = registry.authenticate("noisy-key"), registry.authenticate("steady-key")
    assert noisy is not None
    assert steady is not None
    assert (noisy.name, noisy.rate_per_s, noisy.burst, noisy.tier) == ("noisy", 40.0, 40, TIERS["standard"])
    assert (steady.name, steady.rate_per_s, steady.tier) == ("steady", 500.0, TIERS["standard"])
    assert noisy.models == steady.models == ("cnn",)


def _result(**changes: Any) -> dict[str, Any]:
    """A run's JSON as ``meshserve bench --json`` writes it, from given figures."""
    machine = {"cores": 2, "processor": "x86_64", "platform": "Linux-test", "python": "3.11.7"}
    machine |= {"onnxruntime": "1.19.0", "load_average_1m": 0.5}
    point = _point(32, _calls(9990, 3.0, 5.5, {"UNAVAILABLE": 10}), RedisUsage(400_000, 2.5), cpu_s=9.5)
    result = {
        "scenario": "sweep",
        "date": "2026-12-04T05:00:00+00:00",
        "machine": machine,
        "settings": asdict(CONFIG),
        "model": {"name": "cnn", "version": 1, "max_batch_size": 32},
        "raw": scenarios.raw_json(RAW),
        "points": [scenarios.point_json(point, RAW)],
        **changes,
    }
    return dict(json.loads(json.dumps(result, default=str)))


def test_report_is_dated_and_tabulates_every_point() -> None:
    lines = report.markdown(_result()).splitlines()
    assert lines[0] == "# meshserve bench: sweep, model cnn (version 1), 2026-12-04"
    assert (
        "- machine: 2 cores, x86_64, Linux-test; Python 3.11.7, ONNX Runtime 1.19.0; load average 0.50 at start"
        in lines
    )
    assert any("batch 1: 1000, batch 8: 1600, batch 32: 2000 (best)" in line for line in lines)
    assert "- raw batch 1 after a 4 ms idle gap (how a lone request finds it): p50 2.25 ms" in lines
    assert "- the same on one thread (no pool threads to wake): p50 2.00 ms" in lines
    assert (
        "- the same on a worker's session (threads=1,spin=off, measured): p50 2.20 ms, x1.10 the best raw setting"
        in lines
    )
    row = next(line for line in lines if line.startswith("| 32 |"))
    assert row == "| 32 | 8 | 999 | 3.00 | 5.50 | 10 | 0.50 | +2.00 | +4.00 | 0.95 | 40.0 | 250 | 4000 |"
    assert "- 32: errors UNAVAILABLE 10, answered in p50 2000.00 ms" in lines
    assert "- 32: the client was CPU-bound: its figures are a lower bound" in lines


def test_report_notes_a_busy_machine_and_the_worker_session() -> None:
    raw = replace(RAW, worker_idle_p50_ms=1.8, other_cores=1.2)
    lines = report.markdown(_result(raw=scenarios.raw_json(raw))).splitlines()
    assert (
        "- the same on a worker's session (threads=1,spin=off, measured): p50 1.80 ms, x0.90 the best raw setting"
        in lines
    )
    assert any("other processes kept 1.2 cores busy" in line for line in lines)


def test_report_of_overload_and_noisy_neighbor_states_the_verdict() -> None:
    missed = replace(OVERLOAD, rss_end_kib=500 * 1024)
    overload = report.markdown(
        _result(scenario="overload", raw=None, points=[], overload=scenarios.overload_json(missed))
    )
    assert "**target missed: mesh RSS grew 25% (flat: <= 10%)**" in overload.splitlines()
    phases = [_phase(tenants.ALONE, 4.0), _phase(tenants.AT_LIMIT, 4.4), _phase(tenants.FLOODED, 5.0)]
    noisy = report.markdown(_result(scenario="noisy-neighbor", raw=None, **tenants.noisy_neighbor_json(phases)))
    assert "| flooded | 0 | 500 | 2.00 | 5.00 | 0 | 0.50 | 0 | 0 | 0 | 0.05 | - | - | 0.80 |" in noisy
    assert "**target met**" in noisy


def test_the_report_command_reads_a_json_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_result()))
    assert report.main([str(path)]) == 0
    assert capsys.readouterr().out == report.markdown(_result())


def test_the_scale_out_report_tabulates_each_partition_count_and_shard() -> None:
    """The kept run (docs/benchmarks/2026-12-04f-scale-out.json) reads back as its report."""
    kept = Path(__file__).parent.parent / "docs" / "benchmarks" / "2026-12-04f-scale-out.json"
    result = json.loads(kept.read_text())
    text = report.markdown(result)
    assert [p["partitions"] for p in result["scale_out"]] == [1, 3]
    assert "| 3 | 3 | 369 |" in text  # P = 3 on three masters, its calls/s
    assert "shard 3: CPU µs, commands per call (busy)" in text
    assert "P = 3 over P = 1: 0.73x" in text


def test_the_worker_session_runs_the_real_model_under_the_setting_a_worker_would_use(
    model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real ONNX Runtime on the example mlp, through the worker's own session class and choice."""
    model = load_model(model_repository / "mlp", 1)
    feed = random_inputs(model, 1)
    monkeypatch.setenv("MESHSERVE_INTRA_OP_THREADS", "1")  # as `up --intra-op-threads 1` passes it on
    monkeypatch.setenv("MESHSERVE_INTRA_OP_SPINNING", "0")
    run, engine = worker_session(model)
    assert engine == "threads=1,spin=off, flags"
    monkeypatch.delenv("MESHSERVE_INTRA_OP_THREADS")
    monkeypatch.delenv("MESHSERVE_INTRA_OP_SPINNING")
    measured_run, engine = worker_session(model)
    assert engine.endswith((", measured", ", a CPU budget of 1"))
    idle = interleaved_idle_runs_ns({"fixed": lambda: run(feed), "measured": lambda: measured_run(feed)}, 0.05, 2)
    assert all(idle.values())
    assert all(ns > 0 for runs in idle.values() for ns in runs)


def test_the_plot_is_written_or_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "latency.png"
    report.plot(_result(), path)  # matplotlib is in the dev extra: CI draws it
    assert path.read_bytes().startswith(b"\x89PNG")
    path.unlink()
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(SystemExit, match=r"pip install 'meshserve\[bench\]'"):
        report.plot(_result(), path)
    assert not path.exists()
