"""The lines, JSON and plot of :mod:`meshserve_bench.scenarios`' runs; every figure is given."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from meshserve_bench.display import LatencySeries, plot_latency, text_table
from meshserve_bench.scenarios import (
    ALL,
    OVERLOAD_FACTOR,
    PROBE_CONCURRENCY,
    RSS_FLAT_GROWTH,
    SHED_CODES,
    CallFigures,
    LoadFigures,
    OverloadFigures,
    ScenarioConfig,
    mix_capacity,
    overload_problems,
)
from meshserve_bench.sweep import BUSY_MACHINE_CORES, CLIENT_BOUND_CPU_FRACTION, RawFigures, _raw_line

SWEEP_HEADER = ("concurrency", "model", "req/s", "p50 ms", "p99 ms", "errors", "x raw best", "+p50 ms", "+p99 ms")
OPEN_HEADER = ("rate/s", "model", "sent/s", "ok/s", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "errors", "lag p99 ms")
CPU_COLUMN = "client cpu"
CLIENT_TIMEOUT_SHARE = 0.95  # errors answered this late (share of the deadline) are the client's own timeout


def _rows_models(point: LoadFigures) -> list[str]:
    """The overall row first when there are several models; one row per model."""
    return [ALL, *point.by_model] if len(point.by_model) > 1 else list(point.by_model)


def _figures(point: LoadFigures, model: str) -> CallFigures:
    return point.overall if model == ALL else point.by_model[model]


def _added(figures: CallFigures, raw: RawFigures | None) -> list[str]:
    if raw is None:
        return ["-", "-"]
    return [f"{figures.p50_ms - raw.p50_ms:+.2f}", f"{figures.p99_ms - raw.p99_ms:+.2f}"]


def _ratio(ok_per_s: float, capacity_per_s: float) -> str:
    return f"{ok_per_s / capacity_per_s:.2f}" if capacity_per_s > 0 else "-"


def _cpu(point: LoadFigures, model: str) -> str:
    """Client CPU per wall second, on the first row of a point only (it is the whole client's)."""
    return f"{point.client_cpu_s / point.duration_s:.2f}" if model == _rows_models(point)[0] else ""


def _sweep_row(point: LoadFigures, model: str, raws: Mapping[str, RawFigures]) -> list[str]:
    figures, raw = _figures(point, model), raws.get(model)
    capacity = raw.best_items_per_s() if raw is not None else mix_capacity(raws)
    return [
        f"{point.offered:g}",
        model,
        f"{point.ok_per_s(model):.0f}",
        f"{figures.p50_ms:.2f}",
        f"{figures.p99_ms:.2f}",
        str(sum(figures.errors.values())),
        _ratio(point.ok_per_s(model), capacity),
        *_added(figures, raw),
        _cpu(point, model),
    ]


def _open_row(point: LoadFigures, model: str, raws: Mapping[str, RawFigures]) -> list[str]:
    figures, first = _figures(point, model), model == _rows_models(point)[0]
    return [
        f"{point.offered:g}",
        model,
        f"{point.sent / point.duration_s:.0f}" if first else "",
        f"{point.ok_per_s(model):.0f}",
        f"{figures.p50_ms:.2f}",
        f"{figures.p99_ms:.2f}",
        *_added(figures, raws.get(model)),
        str(sum(figures.errors.values())),
        f"{point.send_lag_p99_ms:.2f}" if first else "",
        _cpu(point, model),
    ]


def _codes(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{code} {count}" for code, count in sorted(errors.items())) or "0"


def _notes(label: str, points: Sequence[LoadFigures], machine: Mapping[str, Any]) -> list[str]:
    lines = []
    other_cores = machine.get("other_cores_during_raw")
    if other_cores is not None and other_cores > BUSY_MACHINE_CORES:
        lines.append(f"note: other processes kept {other_cores:.1f} cores busy during the raw run: figures are noisy")
    for point in points:
        errors = point.overall.errors
        if errors:
            answered_ms = point.overall.error_p50_ms
            lines.append(f"{label} {point.offered:g}: errors {_codes(errors)}, answered in p50 {answered_ms:.1f} ms")
        cpu = point.client_cpu_s / point.duration_s
        if cpu > CLIENT_BOUND_CPU_FRACTION:
            lines.append(f"{label} {point.offered:g}: client cpu {cpu:.2f}, CPU-bound: figures are a lower bound")
    return lines


def format_load_report(
    config: ScenarioConfig, machine: Mapping[str, Any], raws: Mapping[str, RawFigures], points: Sequence[LoadFigures]
) -> str:
    """The table of a sweep over several models or of an open-loop run, with its notes."""
    open_loop = config.scenario == "open-loop"
    header, row = (OPEN_HEADER, _open_row) if open_loop else (SWEEP_HEADER, _sweep_row)
    header = (*header, CPU_COLUMN)
    per = "rate" if open_loop else "point"
    timeout = f", timeout {config.request_timeout_s:g} s" if open_loop else ""
    lines = [
        f"{config.scenario}, models {', '.join(config.models)}, {config.bench.duration_s:g} s per {per}{timeout},"
        f" machine: {machine['cores']} cores, {machine['platform']}",
        *(f"{name}: {_raw_line(raw)}" for name, raw in raws.items()),
    ]
    if not open_loop and len(raws) > 1:
        lines.append(f"equal mix, raw: {mix_capacity(raws):.0f} items/s (the all rows' x raw best)")
    rows = [row(point, model, raws) for point in points for model in _rows_models(point)]
    lines += text_table(header, rows)
    lines += _notes("rate" if open_loop else "concurrency", points, machine)
    return "\n".join(lines)


def _rss_line(figures: OverloadFigures) -> str:
    growth = figures.rss_growth()
    if figures.rss_start_kib is None or figures.rss_end_kib is None or growth is None:
        return "mesh RSS: not measured (--target: the mesh's processes are not this bench's)"
    verdict = "flat" if growth <= RSS_FLAT_GROWTH else "growing"
    return (
        f"mesh RSS: {figures.rss_start_kib / 1024:.1f} MiB at start, {figures.rss_end_kib / 1024:.1f} MiB at end"
        f" ({growth:+.1%}): {verdict} (<= {RSS_FLAT_GROWTH:+.0%})"
    )


def format_overload_report(config: ScenarioConfig, machine: Mapping[str, Any], figures: OverloadFigures) -> str:
    load, overall = figures.load, figures.load.overall
    shed = figures.shed()
    bounded = "within" if overall.p99_ms <= figures.deadline_ms else "past"
    lines = [
        f"overload, models {', '.join(config.models)}, machine: {machine['cores']} cores, {machine['platform']}",
        f"sustainable: {figures.sustainable_per_s:.0f} req/s (closed loop, concurrency {PROBE_CONCURRENCY},"
        f" {figures.probe_duration_s:g} s); sending {load.offered:.0f}/s ({OVERLOAD_FACTOR:g}x)"
        f" for {load.duration_s:g} s, deadline {figures.deadline_ms:g} ms",
        f"accepted (OK): {load.ok_per_s():.0f}/s, p50 {overall.p50_ms:.2f} ms p99 {overall.p99_ms:.2f} ms:"
        f" {bounded} the deadline",
        f"shed: {', '.join(f'{code} {count}' for code, count in shed.items())};"
        f" answered in p50 {overall.error_p50_ms:.1f} ms",
        _rss_line(figures),
        f"client: sent {load.sent / load.duration_s:.0f}/s, send lag p99 {load.send_lag_p99_ms:.2f} ms,"
        f" cpu {load.client_cpu_s / load.duration_s:.2f}",
    ]
    if overall.error_p50_ms >= CLIENT_TIMEOUT_SHARE * figures.deadline_ms:
        lines.append("note: errors came back at the deadline: the client's timeout, so the mesh queued them")
    if sum(shed.values()) == 0:
        lines.append(f"note: nothing shed: the mesh kept up with {OVERLOAD_FACTOR:g}x the probe's rate")
    problems = overload_problems(figures)
    lines.append("target met" if not problems else "target missed: " + "; ".join(problems))
    return "\n".join(lines)


def _point_json(point: LoadFigures) -> dict[str, Any]:
    return {**asdict(point), "ok_per_s": point.ok_per_s(), "sent_per_s": point.sent / point.duration_s}


def report_json(
    config: ScenarioConfig,
    machine: Mapping[str, Any],
    raws: Mapping[str, RawFigures],
    points: Sequence[LoadFigures] = (),
    overload: OverloadFigures | None = None,
) -> dict[str, Any]:
    """Every figure of the run, for ``--json``."""
    report: dict[str, Any] = {"scenario": config.scenario, "settings": asdict(config), "machine": dict(machine)}
    report["raw"] = {name: {**asdict(raw), "best_items_per_s": raw.best_items_per_s()} for name, raw in raws.items()}
    report["points"] = [_point_json(point) for point in points]
    if overload is not None:
        problems = overload_problems(overload)
        report["overload"] = {
            **asdict(overload),
            "load": _point_json(overload.load),
            "shed": overload.shed(),
            "shed_codes": list(SHED_CODES),
            "rss_growth": overload.rss_growth(),
            "problems": problems,
            "target_met": not problems,
        }
    return report


def plot_points(
    path: Path, config: ScenarioConfig, points: Sequence[LoadFigures], raws: Mapping[str, RawFigures]
) -> None:
    """p50 and p99 per concurrency or rate: each model's line (and all's with several), raw's flat lines."""
    open_loop = config.scenario == "open-loop"
    models = _rows_models(points[0]) if points else []
    series = [
        LatencySeries(
            model,
            [_figures(point, model).p50_ms for point in points],
            [_figures(point, model).p99_ms for point in points],
        )
        for model in models
    ]
    raw_ms = {name: (raw.p50_ms, raw.p99_ms) for name, raw in raws.items() if not math.isnan(raw.p50_ms)}
    title = f"meshserve {config.scenario}: {', '.join(config.models)}, {config.bench.duration_s:g} s per point"
    x_label = "open-loop rate, calls/s" if open_loop else "closed-loop concurrency"
    plot_latency(path, title, x_label, [point.offered for point in points], series, raw_ms)
