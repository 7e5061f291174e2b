"""``meshserve bench`` open-loop, overload and several models: schedule, figures, verdict,
lines and plot from given figures, and one short open-loop run against the in-process mesh
(no timed assertion)."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshserve.cli.main import build_parser
from meshserve_bench import display as bench_display
from meshserve_bench import scenarios as bench_scenarios
from meshserve_bench import scenarios_report as report
from meshserve_bench.scenarios import (
    CallFigures,
    LoadFigures,
    OverloadFigures,
    ScenarioConfig,
    _TimedTally,
    load_figures,
    overload_problems,
)
from meshserve_bench.sweep import BenchConfig, RawFigures, _find_model, build_request
from meshserve_bench.tenants import due_times_ns

MS = 1_000_000  # ns
BENCH = BenchConfig(
    target=None,
    model="cnn",
    concurrencies=(1, 32),
    duration_s=10.0,
    warmup_s=2.0,
    channels=None,
    json_path=None,
    repository=Path("/nonexistent"),
    max_batch=None,
)
OPEN = ScenarioConfig(BENCH, "open-loop", ("cnn", "mlp"), (50.0, 100.0), 2.0, None)
MACHINE = {"cores": 2, "platform": "Linux-test"}
RAWS = {
    "cnn": RawFigures(p50_ms=1.0, p99_ms=1.5, items_per_s_by_batch={1: 1000.0}),
    "mlp": RawFigures(p50_ms=0.5, p99_ms=0.75, items_per_s_by_batch={1: 4000.0}),
}


def _tally(latencies_ms: list[int], errors: dict[str, int] | None = None, error_ms: int = 0) -> _TimedTally:
    tally = _TimedTally(latencies_ns=[ms * MS for ms in latencies_ms])
    for code, count in (errors or {}).items():
        tally.errors[code] += count
        tally.error_latencies_ns += [error_ms * MS] * count
    return tally


def _calls(ok: int, p50_ms: float, p99_ms: float, errors: dict[str, int] | None = None) -> CallFigures:
    return CallFigures(ok, p50_ms, p99_ms, errors or {}, math.nan if not errors else 2000.0)


def _load(offered: float, overall: CallFigures, by_model: dict[str, CallFigures] | None = None) -> LoadFigures:
    return LoadFigures(
        offered=offered,
        duration_s=10.0,
        overall=overall,
        by_model=by_model or {"cnn": overall},
        sent=int(offered * 10),
        send_lag_p99_ms=0.5,
        client_cpu_s=1.0,
    )


OVERLOAD = OverloadFigures(
    sustainable_per_s=400.0,
    probe_duration_s=3.0,
    deadline_ms=2000.0,
    load=_load(800.0, _calls(4000, 80.0, 150.0, {"RESOURCE_EXHAUSTED": 3900, "DEADLINE_EXCEEDED": 100})),
    rss_start_kib=400 * 1024,
    rss_end_kib=410 * 1024,
)


def test_schedule_is_uniform_from_the_first_send_and_stops_before_the_end() -> None:
    assert list(due_times_ns(0, 4.0, 1_000_000_000)) == [0, 250 * MS, 500 * MS, 750 * MS]
    times = list(due_times_ns(7, 3.0, 10_000_000_007))
    assert len(times) == 30
    assert times[-1] == 7 + round(29 * 1e9 / 3.0)  # from the first, not summed steps


@pytest.mark.parametrize("text", ["", "0", "10,x", "5,-1", "nan"])
def test_rates_reject_bad_values(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        bench_scenarios._rate_list(text)


def test_flags_build_the_scenario_config(tmp_path: Path) -> None:
    argv = ["bench", "--scenario", "open-loop", "--rates", "50,100.5", "--models", "cnn,mlp"]
    args = build_parser().parse_args([*argv, "--model-repository", str(tmp_path), "--plot", "out.png"])
    config = bench_scenarios.scenario_config(args)
    assert (config.rates_per_s, config.models, config.request_timeout_s) == ((50.0, 100.5), ("cnn", "mlp"), 2.0)
    assert config.plot_path == Path("out.png")
    assert bench_scenarios.uses_scenarios(args)
    sweep = build_parser().parse_args(["bench", "--models", "cnn"])
    assert not bench_scenarios.uses_scenarios(sweep)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--models", "cnn,cnn"])


def test_overload_refuses_a_plot(tmp_path: Path) -> None:
    args = build_parser().parse_args(["bench", "--scenario", "overload", "--plot", "x.png"])
    with pytest.raises(SystemExit, match="not overload"):
        bench_scenarios.scenario_config(args)


def test_figures_per_model_and_overall_from_every_call() -> None:
    tallies = {"cnn": _tally([10, 20, 30, 40]), "mlp": _tally([1, 2], {"UNAVAILABLE": 2}, error_ms=5)}
    point = load_figures(50.0, 2.0, tallies, sends_lag_ns=[MS, 3 * MS], cpu_s=0.5)
    assert point.by_model["cnn"].p50_ms == pytest.approx(25.0)
    assert point.overall.ok == 6
    assert point.overall.p50_ms == pytest.approx(15.0)  # the median of all six, not of the medians
    assert point.overall.errors == {"UNAVAILABLE": 2}
    assert point.overall.error_p50_ms == pytest.approx(5.0)
    assert math.isnan(point.by_model["cnn"].error_p50_ms)
    assert (point.sent, point.ok_per_s(), point.ok_per_s("mlp")) == (2, 3.0, 1.0)
    assert point.send_lag_p99_ms == pytest.approx(2.98)
    closed = load_figures(8, 2.0, tallies, sends_lag_ns=None, cpu_s=0.5)
    assert closed.sent == 8
    assert math.isnan(closed.send_lag_p99_ms)


def test_mix_capacity_is_the_harmonic_mean_of_each_best() -> None:
    assert bench_scenarios.mix_capacity(RAWS) == pytest.approx(1600.0)


def test_overload_met_when_bounded_shed_and_flat() -> None:
    assert overload_problems(OVERLOAD) == []
    assert OVERLOAD.shed() == {"RESOURCE_EXHAUSTED": 3900, "DEADLINE_EXCEEDED": 100, "other": 0}


@pytest.mark.parametrize(
    ("figures", "problem"),
    [
        (replace(OVERLOAD, load=_load(800.0, _calls(4000, 80.0, 2500.0))), "past the 2000 ms deadline"),
        (replace(OVERLOAD, load=_load(800.0, _calls(0, math.nan, math.nan))), "no call was accepted"),
        (replace(OVERLOAD, load=_load(800.0, _calls(10, 1.0, 2.0, {"INTERNAL": 3}))), "3 calls failed with codes"),
        (replace(OVERLOAD, rss_end_kib=500 * 1024), "mesh RSS grew 25%"),
    ],
)
def test_overload_missed(figures: OverloadFigures, problem: str) -> None:
    assert any(problem in text for text in overload_problems(figures))
    assert "target missed" in report.format_overload_report(OPEN, MACHINE, figures)


def test_an_overload_miss_names_a_client_that_lagged_behind_its_schedule() -> None:
    late = _load(800.0, _calls(4000, 80.0, 2500.0))
    on_time = overload_problems(replace(OVERLOAD, load=late))
    lagging = overload_problems(replace(OVERLOAD, load=replace(late, send_lag_p99_ms=750.0)))
    assert not any("send lag" in text for text in on_time)
    assert any("past the 2000 ms deadline" in text and "send lag p99 750 ms" in text for text in lagging)


def test_overload_lines_with_given_figures() -> None:
    lines = report.format_overload_report(replace(OPEN, models=("cnn",)), MACHINE, OVERLOAD).splitlines()
    assert lines == [
        "overload, models cnn, machine: 2 cores, Linux-test",
        "sustainable: 400 req/s (closed loop, concurrency 32, 3 s); sending 800/s (2x) for 10 s, deadline 2000 ms",
        "accepted (OK): 400/s, p50 80.00 ms p99 150.00 ms: within the deadline",
        "shed: RESOURCE_EXHAUSTED 3900, DEADLINE_EXCEEDED 100, other 0; answered in p50 2000.0 ms",
        "mesh RSS: 400.0 MiB at start, 410.0 MiB at end (+2.5%): flat (<= +10%)",
        "client: sent 800/s, send lag p99 0.50 ms, cpu 0.10",
        "note: errors came back at the deadline: the client's timeout, so the mesh queued them",
        "target met",
    ]
    unmeasured = replace(OVERLOAD, rss_start_kib=None, rss_end_kib=None)
    assert overload_problems(unmeasured) == []
    assert "mesh RSS: not measured" in report.format_overload_report(OPEN, MACHINE, unmeasured)
    figures = report.report_json(OPEN, MACHINE, {}, overload=OVERLOAD)["overload"]
    assert (figures["target_met"], figures["shed"]["other"], figures["rss_growth"]) == (True, 0, pytest.approx(0.025))


def _two_models_point(offered: float) -> LoadFigures:
    cnn, mlp = _calls(250, 8.0, 12.0), _calls(249, 5.0, 9.0, {"DEADLINE_EXCEEDED": 1})
    return _load(offered, _calls(499, 6.5, 11.0, {"DEADLINE_EXCEEDED": 1}), {"cnn": cnn, "mlp": mlp})


def test_open_loop_lines_with_given_figures() -> None:
    lines = report.format_load_report(OPEN, MACHINE, RAWS, [_two_models_point(50.0)]).splitlines()
    assert lines == [
        "open-loop, models cnn, mlp, 10 s per rate, timeout 2 s, machine: 2 cores, Linux-test",
        "cnn: raw ONNX Runtime: batch 1 p50 1.00 ms p99 1.50 ms, 1000 items/s (best)",
        "mlp: raw ONNX Runtime: batch 1 p50 0.50 ms p99 0.75 ms, 4000 items/s (best)",
        "rate/s  model  sent/s  ok/s  p50 ms  p99 ms  +p50 ms  +p99 ms  errors  lag p99 ms  client cpu",
        "50      all    50      50    6.50    11.00   -        -        1       0.50        0.10",
        "50      cnn            25    8.00    12.00   +7.00    +10.50   0",
        "50      mlp            25    5.00    9.00    +4.50    +8.25    1",
        "rate 50: errors DEADLINE_EXCEEDED 1, answered in p50 2000.0 ms",
    ]


def test_sweep_over_two_models_sets_all_against_the_mix() -> None:
    sweep = replace(OPEN, scenario="sweep")
    lines = report.format_load_report(sweep, MACHINE, RAWS, [_two_models_point(32)]).splitlines()
    assert lines[3] == "equal mix, raw: 1600 items/s (the all rows' x raw best)"
    assert lines[4] == "concurrency  model  req/s  p50 ms  p99 ms  errors  x raw best  +p50 ms  +p99 ms  client cpu"
    assert lines[5].split() == ["32", "all", "50", "6.50", "11.00", "1", "0.03", "-", "-", "0.10"]
    assert lines[6].split() == ["32", "cnn", "25", "8.00", "12.00", "0", "0.03", "+7.00", "+10.50"]
    points = report.report_json(sweep, MACHINE, RAWS, [_two_models_point(32)])["points"]
    assert points[0]["by_model"]["mlp"]["errors"] == {"DEADLINE_EXCEEDED": 1}


def test_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "latency.png"
    report.plot_points(path, OPEN, [_two_models_point(50.0), _two_models_point(100.0)], RAWS)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(SystemExit, match=r"pip install 'meshserve\[bench\]'"):
        report.plot_points(tmp_path / "x.png", OPEN, [_two_models_point(50.0)], RAWS)


def test_progress_bar_is_off_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with bench_display.progress_bar("bench", 1.0):
        pass
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_descendants_and_rss_from_proc() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert child.pid in bench_scenarios.descendants(os.getpid())
        assert bench_scenarios.mesh_rss_kib([os.getpid(), child.pid]) > (bench_scenarios.rss_kib(os.getpid()) or 0)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert bench_scenarios.rss_kib(child.pid) is None


async def test_open_and_closed_loop_against_the_mesh(mesh: Any, model_repository: Path) -> None:
    requests = {name: build_request(_find_model(model_repository, name)) for name in ("cnn", "mlp")}
    async with bench_scenarios.connect(mesh.address, 2, requests, timeout_s=10.0) as connection:
        opened = await bench_scenarios.measure_open(connection, 20.0, bench_scenarios.window_after(0.0, 0.5))
        closed = await bench_scenarios.measure_closed(connection, 2, bench_scenarios.window_after(0.0, 0.3))
    for point in (opened, closed):
        assert set(point.by_model) == {"cnn", "mlp"}
        assert point.overall.errors == {}
        assert point.overall.ok == sum(figures.ok for figures in point.by_model.values()) > 0
    assert opened.sent > 0


async def test_the_noisy_tenants_flood_runs_in_a_spawned_process(mesh: Any, model_repository: Path) -> None:
    import asyncio
    import concurrent.futures
    import multiprocessing

    from meshserve_bench import tenants as bench_tenants

    request = build_request(_find_model(model_repository, "mlp"))
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as flooder:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(flooder, bench_tenants._warm_flooder)
        window = bench_scenarios.window_after(0.1, 1.0)
        plan = bench_tenants._FloodPlan(mesh.address, request.SerializeToString(), (), 40.0, 2, window)
        figures = await loop.run_in_executor(flooder, bench_tenants._flood_process, plan)
    assert set(figures.codes) == {"OK"}  # the open development tenant: nothing refused
    assert figures.codes["OK"] > 0
    assert figures.details == {}
    assert figures.cpu_s > 0  # the child's own CPU, not this process's
