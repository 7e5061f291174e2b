"""A dated Markdown report from a ``meshserve bench --json`` file, for docs/benchmarks/.

    python -m meshserve_bench.report FILE.json [--plot FILE.png]

``meshserve bench`` prints the same report at the end of a run. Only the JSON is read,
so a report can be made again from a run's file, anywhere. ``--plot`` needs the
``meshserve[bench]`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BUSY_MACHINE_CORES = 0.25  # other processes busier than this during the raw run make figures noisy
CLIENT_BOUND_CPU_FRACTION = 0.9  # a client this busy measures itself as much as the mesh
Figures = Mapping[str, Any]


def num(value: float | None, spec: str = ".2f") -> str:
    """A figure, or "-" where there is none (None, NaN)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def codes(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{code} {count}" for code, count in sorted(errors.items())) or "0"


def heading(result: Figures) -> list[str]:
    machine, settings, model = result["machine"], result["settings"], result["model"]
    where = f"`{settings['target']}`" if settings["target"] else "a mesh the bench started"
    return [
        f"# meshserve bench: {result['scenario']}, model {model['name']} (version {model['version']}),"
        f" {result['date'][:10]}",
        "",
        f"- date: {result['date']} (UTC)",
        f"- machine: {machine['cores']} cores, {machine['processor']}, {machine['platform']};"
        f" Python {machine['python']}, ONNX Runtime {machine['onnxruntime']};"
        f" load average {machine['load_average_1m']:.2f} at start",
        f"- mesh: {where}; {settings['duration_s']:g} s measured per point after {settings['warmup_s']:g} s warm-up",
    ]


def raw_lines(raw: Figures | None) -> list[str]:
    if raw is None:
        return []
    by_batch = ", ".join(
        f"batch {batch}: {items_per_s:.0f}" + (" (best)" if int(batch) == raw["best_batch"] else "")
        for batch, items_per_s in sorted(raw["items_per_s_by_batch"].items(), key=lambda item: int(item[0]))
    )
    lines = [
        f"- raw ONNX Runtime, in the bench's process on the same model.onnx: batch 1 p50 {num(raw['p50_ms'])} ms,"
        f" p99 {num(raw['p99_ms'])} ms; items/s {by_batch}",
        f"- raw batch 1 after a 4 ms idle gap (how a lone request finds it): p50 {num(raw['idle_p50_ms'])} ms",
    ]
    best_raw_ms = min(raw["idle_p50_ms"], raw["one_thread_idle_p50_ms"])
    lines += [
        f"- the same on one thread (no pool threads to wake): p50 {num(raw['one_thread_idle_p50_ms'])} ms",
        f"- the same on a worker's session ({raw['worker_engine']}): p50 {num(raw['worker_idle_p50_ms'])} ms,"
        f" x{raw['worker_idle_p50_ms'] / best_raw_ms:.2f} the best raw setting",
    ]
    if (raw["other_cores"] or 0.0) > BUSY_MACHINE_CORES:
        lines.append(f"- note: other processes kept {raw['other_cores']:.1f} cores busy during the raw run: noisy")
    return lines


def points_table(result: Figures) -> list[str]:
    open_loop = result["scenario"] == "open-loop"
    header = ["rate/s" if open_loop else "concurrency", "channels", "ok/s", "p50 ms", "p99 ms", "errors"]
    header += ["sent/s", "send lag p99 ms"] if open_loop else ["x raw best"]
    header += ["+p50 ms", "+p99 ms", "client cpu", "redis cmds/call", "redis cpu µs/call", "calls/s per Redis core"]
    rows, notes = [], []
    for point in result["points"]:
        calls = point["calls"]
        row = [f"{point['offered']:g}", str(point["channels"]), f"{point['ok_per_s']:.0f}", num(calls["p50_ms"])]
        row += [num(calls["p99_ms"]), str(sum(calls["errors"].values()))]
        if open_loop:
            row += [f"{point['sent'] / point['duration_s']:.0f}", num(point["send_lag_p99_ms"])]
        else:
            row.append(num(point.get("throughput_ratio")))
        row += [num(point.get("added_p50_ms"), "+.2f"), num(point.get("added_p99_ms"), "+.2f")]
        row += [num(point["client_cpu_fraction"]), num(point.get("redis_commands_per_call"), ".1f")]
        row += [num(point.get("redis_cpu_us_per_call"), ".0f"), num(point.get("redis_core_calls_per_s"), ".0f")]
        rows.append(row)
        if calls["errors"]:
            notes.append(
                f"- {point['offered']:g}: errors {codes(calls['errors'])},"
                f" answered in p50 {num(calls['error_p50_ms'])} ms"
            )
        if point["client_cpu_fraction"] > CLIENT_BOUND_CPU_FRACTION:
            notes.append(f"- {point['offered']:g}: the client was CPU-bound: its figures are a lower bound")
    return table(header, rows) + (["", *notes] if notes else [])


HOPS = ("gateway", "worker", "router", "redis")
REFERENCE_CONCURRENCY = 32  # where the report states the mesh's throughput over the reference's


def hops_lines(result: Figures) -> list[str]:
    """Where each request's CPU went, per process, and the one-process reference server
    beside the mesh; [] when the run measured neither."""
    points, reference = result.get("points") or [], (result.get("reference") or {}).get("points") or []
    if not any("cpu_us_per_request" in point for point in points) and not reference:
        return []
    header = ["concurrency", *(f"{hop} µs" for hop in HOPS), "model compute CPU µs", "worker beyond compute CPU µs"]
    header += ["model compute wall µs", "worker CPU less compute wall µs"]
    header += ["redis round trips", "reference ok/s", "reference p50 ms", "reference cpu µs", "mesh / reference"]
    header += ["gRPC floor µs", "gateway over floor µs"]
    by_offered = {point["offered"]: point for point in reference}
    rows = []
    for point in points:
        cpu = point.get("cpu_us_per_request") or {}
        ref = by_offered.get(point["offered"]) or {}
        row = [f"{point['offered']:g}", *(num(cpu.get(hop), ".0f") for hop in HOPS)]
        row += [num(point.get("model_compute_cpu_us_per_request"), ".0f")]
        row += [num(point.get("worker_beyond_compute_cpu_us_per_request"), ".0f")]
        row += [num(point.get("model_compute_us_per_request"), ".0f")]
        row += [num(point.get("worker_beyond_compute_us_per_request"), ".0f")]
        row += [num(point.get("redis_round_trips_per_call"), ".1f")]
        row += [num(ref.get("ok_per_s"), ".0f"), num((ref.get("calls") or {}).get("p50_ms"))]
        row += [num((ref.get("cpu_us_per_request") or {}).get("reference"), ".0f")]
        row += [num(point.get("reference_ratio"))]
        row += [num(point.get("grpc_floor_cpu_us_per_request"), ".0f")]
        rows.append([*row, num(point.get("gateway_over_floor_us_per_request"), ".0f")])
    lines = ["", "CPU per request by process (/proc, the measured window's calls):", "", *table(header, rows)]
    engines = sorted({engine for point in points for engine in point.get("worker_engines") or ()})
    if engines:
        lines += ["", f"- the mesh's workers ran ONNX Runtime as: {'; '.join(engines)}"]
    at = next((p for p in points if p["offered"] == REFERENCE_CONCURRENCY and "reference_ratio" in p), None)
    if at is not None:
        lines += [
            "",
            f"- at concurrency {REFERENCE_CONCURRENCY}: the mesh does {num(at['reference_ratio'])} of the one-process"
            f" reference server's throughput (same model, batching and load generator)",
        ]
    over = next(
        (p for p in points if p["offered"] == REFERENCE_CONCURRENCY and "gateway_over_floor_us_per_request" in p), None
    )
    if over is not None:
        lines += [
            f"- at concurrency {REFERENCE_CONCURRENCY}: the gateway spends"
            f" {num(over['cpu_us_per_request']['gateway'], '.0f')} µs of CPU per request, a bare grpc.aio server"
            f" answering at the same pace {num(over['grpc_floor_cpu_us_per_request'], '.0f')} µs per call"
            f" (the gRPC floor): {num(over['gateway_over_floor_us_per_request'], '.0f')} µs are the gateway's own"
        ]
    alone = next((p for p in points if p["offered"] == 1 and "no_wait_added_p50_ms" in p), None)
    if alone is not None:
        no_wait = ((result.get("reference_no_wait") or {}).get("points") or [{}])[0]
        lines += [
            f"- at concurrency 1: p50 {num(alone['calls']['p50_ms'])} ms, {num(alone['no_wait_added_p50_ms'])} ms"
            f" above the one-process reference server without batching wait"
            f" ({num((no_wait.get('calls') or {}).get('p50_ms'))} ms)"
        ]
    commands = next((p.get("redis_commands_by_name_per_call") for p in points if p["offered"] == 1), None)
    if commands:
        shown = ", ".join(f"{name} {calls:.2f}" for name, calls in commands.items() if calls >= 0.05)
        lines += [f"- Redis commands of one call at concurrency 1, by name: {shown}"]
    return lines


def overload_lines(overload: Figures, deadline_s: float) -> list[str]:
    load, calls, shed = overload["load"], overload["load"]["calls"], overload["shed"]
    growth = overload["rss_growth"]
    rss = "not measured (the mesh's processes are not this bench's)"
    if growth is not None:
        start_mib, end_mib = overload["rss_start_kib"] / 1024, overload["rss_end_kib"] / 1024
        rss = f"{start_mib:.1f} MiB at start, {end_mib:.1f} MiB at end ({growth:+.1%})"
    verdict = "target met" if overload["target_met"] else "target missed: " + "; ".join(overload["problems"])
    return [
        f"- sustainable: {overload['sustainable_per_s']:.0f} req/s (closed loop, concurrency 32,"
        f" {overload['probe_duration_s']:g} s); sent {load['offered']:.0f}/s, deadline {deadline_s * 1e3:g} ms",
        f"- accepted: {load['ok_per_s']:.0f}/s, p50 {num(calls['p50_ms'])} ms, p99 {num(calls['p99_ms'])} ms",
        f"- shed: {codes(shed)}; answered in p50 {num(calls['error_p50_ms'], '.1f')} ms",
        f"- mesh RSS: {rss}",
        f"- client: send lag p99 {num(load['send_lag_p99_ms'])} ms, cpu {num(load['client_cpu_fraction'])};"
        f" Redis per call: {num(load.get('redis_commands_per_call'), '.1f')} commands,"
        f" {num(load.get('redis_cpu_us_per_call'), '.0f')} µs CPU",
        "",
        f"**{verdict}**",
    ]


def tenant_phase_lines(result: Figures) -> list[str]:
    """The table of B and A in each phase (noisy-neighbor, retry-storm), with error details."""
    header = ["phase", "A sends/s", "B ok", "B p50 ms", "B p99 ms", "B errors", "B send lag p99 ms", "A ok"]
    header += ["A refused", "A other", "client cpu B", "client cpu A", "gateway cpu", "machine busy cores"]
    rows, details, duration_s = [], [], result["settings"]["duration_s"]
    for name, phase in result["phases"].items():
        steady, flood = phase["steady"], phase["flood"] or {"calls": {"ok": 0, "errors": {}, "error_details": {}}}
        b_calls, a_calls, busy_s = steady["calls"], flood["calls"], steady["machine_busy_s"]
        a_errors = dict(a_calls["errors"])
        refused = a_errors.pop("RESOURCE_EXHAUSTED", 0)
        row = [name, f"{phase['flood_rate_per_s']:g}", str(b_calls["ok"]), num(b_calls["p50_ms"])]
        row += [num(b_calls["p99_ms"]), codes(b_calls["errors"]), num(steady["send_lag_p99_ms"]), str(a_calls["ok"])]
        row += [
            str(refused),
            codes(a_errors),
            num(steady["client_cpu_fraction"]),
            num(flood.get("client_cpu_fraction")),
        ]
        gateway_s = phase.get("gateway_cpu_s")
        rows.append([*row, num(gateway_s and gateway_s / duration_s), num(busy_s and busy_s / duration_s)])
        shown = {**a_calls["error_details"], **b_calls["error_details"]}
        details += [
            f"- {name}: first {code}: {text}" for code, text in sorted(shown.items()) if code != "RESOURCE_EXHAUSTED"
        ]
    settings = result["settings"]
    return [
        f"- tenant B sends {settings['steady_rate_per_s']:g}/s;"
        f" tenant A is limited to {settings['noisy_limit_per_s']:g}/s",
        "",
        *table(header, rows),
        "",
        *details,
        f"- gateway CPU per refusal: {num(result.get('gateway_cpu_per_refusal_ms'), '.3f')} ms"
        " (beyond what its admitted calls cost at the alone phase's rate)",
    ]


def noisy_neighbor_lines(result: Figures) -> list[str]:
    verdict = "target met" if result["target_met"] else "target missed"
    return [
        *tenant_phase_lines(result),
        f"- B's p99 beside A at its limit: {num(result['at_limit_p99_ratio'])}x alone;"
        f" under the flood: {num(result['p99_ratio'])}x",
        "",
        f"**{verdict}** (B's p99 under the flood <= {result['target_p99_ratio']:g}x alone, no error for B)",
    ]


def large_lines(result: Figures) -> list[str]:
    """The large scenario's table: latency beside raw ONNX Runtime, each process's peak."""
    roles = list(result["sizes"][0]["peak_kib"]) if result["sizes"] else []
    header = ["MiB", "calls", "errors", "p50 ms", "p99 ms", "raw p50 ms", "added p50 ms", "gRPC echo p50 ms"]
    header += [f"{role} peak MiB (growth, payloads)" for role in roles]
    rows = []
    for size in result["sizes"]:
        row = [f"{size['size_mib']:g}", str(size["calls"]), str(size["errors"])]
        row += [num(size[key], ".1f") for key in ("p50_ms", "p99_ms", "raw_p50_ms", "added_p50_ms")]
        row.append(num(size.get("echo_p50_ms") or None, ".1f"))  # older reports have none
        for role in roles:
            peak = size["peak_kib"][role]
            row.append(f"{peak / 1024:.0f} ({size['peak_over_payload'][role]:.1f}x)" if peak else "-")
        rows.append(row)
    note = (
        "Peak: a process's highest resident memory during the size's calls (VmHWM, reset before them);"
        " growth: that peak over its resident memory before them, in payloads. One call at a time."
        " gRPC echo: the request's bytes to a grpc-python echo server in the bench's process and back,"
        " gRPC's own floor."
    )
    return [*table(header, rows), "", note]


def retry_storm_lines(result: Figures) -> list[str]:
    settings, verdict = result["settings"], "target met" if result["target_met"] else "target missed"
    return [
        *tenant_phase_lines(result),
        f"- A: {settings['storm_connections']} connections, each retrying {settings['storm_pause_ms']:g} ms"
        f" after a refusal: {num(result['a_refused_per_s'], '.0f')} refusals/s",
        f"- B's p99 alone {num(result['p99_alone_ms'])} ms, under the storm {num(result['p99_storm_ms'])} ms:"
        f" {num(result['p99_ratio'])}x; B's errors: {codes(result['b_errors'])}",
        "",
        f"**{verdict}** (B's p99 under the storm <= {result['target_p99_ratio']:g}x alone, no error for B)",
    ]


def rollout_lines(result: Figures) -> list[str]:
    rollout = result["rollout"]
    rows = [
        [phase["name"], str(phase["calls"]), shares(phase["shares"]), shares(phase["expected"]), num(phase["p99_ms"])]
        for phase in rollout["phases"]
    ]
    verdict = "no call failed" if not rollout["failed_calls"] else f"{rollout['failed_calls']} calls FAILED"
    return [
        f"- closed loop of {result['concurrency']}, {result['calls_per_phase']} calls per phase,"
        f" {rollout['calls']} calls in all: **{verdict}**"
        + (f" {codes(rollout['failures'])}" if rollout["failures"] else ""),
        f"- p99 steady {num(rollout['p99_steady_ms'])} ms, during the rollout {num(rollout['p99_rollout_ms'])} ms"
        f" (p50 {num(rollout['p50_steady_ms'])} / {num(rollout['p50_rollout_ms'])} ms)",
        "",
        *table(["phase", "calls", "versions answered", "weights", "p99 ms"], rows),
        *(["", *(f"- {problem}" for problem in rollout["problems"])] if rollout["problems"] else []),
    ]


def shares(by_version: Figures) -> str:
    return ", ".join(f"v{version} {share:.0%}" for version, share in by_version.items())


def many_models_lines(result: Figures) -> list[str]:
    """The many-models scenario: the hit ratio, cold-start waits beside the hits'."""
    many = result["many_models"]
    header = ["calls", "errors", "hit ratio", "cold p50 ms", "cold p99 ms", "hit p50 ms", "hit p99 ms"]
    ratio = many["hit_ratio"]
    row = [str(many["calls"]), codes(many["errors"]), "-" if ratio is None else f"{ratio:.1%}"]
    row += [num(many[key], ".1f") for key in ("cold_p50_ms", "cold_p99_ms", "hit_p50_ms", "hit_p99_ms")]
    note = (
        f"{many['models']} models, room for {many['room']}; {many['clients']} closed-loop clients, models drawn"
        f" with Zipf weights (s = {many['zipf_s']:g}); minimum residency {many['min_residency_s']:g} s. A hit: the"
        " model was resident (ModelReady) when the call was sent; a cold call's latency is its cold-start wait."
    )
    return [*table(header, [row]), "", note]


def stream_lines(result: Figures) -> list[str]:
    rows = [
        [
            p["mode"],
            str(p["concurrency"]),
            num(p["calls_per_s"], ".0f"),
            num(p["calls"]["p50_ms"]),
            num(p["calls"]["p99_ms"]),
            codes(p["calls"]["errors"]),
        ]
        for p in result["stream_points"]
    ]
    cache = result["cache"]
    return [
        *table(["mode", "concurrency", "calls/s", "p50 ms", "p99 ms", "errors"], rows),
        "",
        f"- cache, one call at a time: miss p50 {num(cache['miss']['p50_ms'])} ms (p99"
        f" {num(cache['miss']['p99_ms'])}), hit p50 {num(cache['hit']['p50_ms'])} ms (p99"
        f" {num(cache['hit']['p99_ms'])}); answers marked cached: {cache['miss']['cached']}/{cache['miss']['ok']}"
        f" misses, {cache['hit']['cached']}/{cache['hit']['ok']} hits",
        *generation_lines(result.get("generation_points", [])),
    ]


def sequences_lines(result: Figures) -> list[str]:
    rows = [
        [
            p["kind"],
            str(p["clients"]),
            num(p["calls_per_s"], ".0f"),
            num(p["calls"]["p50_ms"]),
            num(p["calls"]["p99_ms"]),
            codes(p["calls"]["errors"]),
        ]
        for p in result["sequence_points"]
    ]
    single = result["single"]
    added_ms = single["step"]["p50_ms"] - single["stateless"]["p50_ms"]
    return [
        *table(["kind", "clients", "calls/s", "p50 ms", "p99 ms", "errors"], rows),
        "",
        f"- one call at a time: stateless p50 {num(single['stateless']['p50_ms'])} ms (p99"
        f" {num(single['stateless']['p99_ms'])}), step p50 {num(single['step']['p50_ms'])} ms (p99"
        f" {num(single['step']['p99_ms'])}): a step adds {num(added_ms)} ms at p50",
    ]


def scale_out_lines(result: Figures) -> list[str]:
    """calls/s with 1 and 3 queue partitions, and each master's CPU and commands per call."""
    masters = result["settings"]["masters"]
    header = ["partitions", "masters holding them", "calls/s", "p50 ms", "p99 ms", "errors"]
    header += [f"shard {i + 1}: CPU µs, commands per call (busy)" for i in range(masters)]
    rows = []
    for p in result["scale_out"]:
        calls = p["point"]["calls"]
        row = [
            str(p["partitions"]),
            str(len(p["masters_holding_partitions"])),
            num(p["calls_per_s"], ".0f"),
            num(calls["p50_ms"]),
            num(calls["p99_ms"]),
            codes(calls["errors"]),
        ]
        row += [
            f"{num(s['cpu_us_per_call'], '.0f')}, {num(s['commands_per_call'], '.1f')} ({s['busy_share']:.0%})"
            for s in p["shards"]
        ]
        rows.append(row)
    speedup = result.get("speedup")
    busy = [p["point"].get("machine_busy_s") for p in result["scale_out"]]
    return [
        *table(header, rows),
        "",
        f"- P = 3 over P = 1: {num(speedup)}x calls/s at {result['settings']['concurrency']} clients",
        "- machine busy (all processes, core-seconds per second of the window): "
        + ", ".join(
            f"P = {p['partitions']}: {num(b / p['point']['duration_s'] if b is not None else None)}"
            for p, b in zip(result["scale_out"], busy, strict=True)
        ),
    ]


def generation_lines(points: list[Figures]) -> list[str]:
    """The example generator's tokens per second and time to first token."""
    if not points:
        return []
    rows = [
        [
            str(p["concurrency"]),
            num(p["tokens_per_s"], ".0f"),
            str(p["requests"]),
            num(p["ttft_p50_ms"]),
            num(p["ttft_p99_ms"]),
            num(p["token_gap_p50_ms"]),
            str(p["errors"]),
        ]
        for p in points
    ]
    header = ["concurrency", "tokens/s", "generations", "TTFT p50 ms", "TTFT p99 ms", "ms/token p50", "errors"]
    return ["", "generation (example generator, prompt 4 tokens, 64 generated, greedy):", "", *table(header, rows)]


SCALING_HOPS = ("gateway", "worker", "router")


def scaling_lines(result: Figures) -> list[str]:
    """The scaling scenario: each axis's points, then each hop's fitted growth along it."""
    lines: list[str] = []
    for axis, figures in result["axes"].items():
        header = ["point", "x", "mean batch", "ok/s", "p50 ms", "p99 ms", "errors"]
        header += [f"{hop} µs" for hop in SCALING_HOPS]
        header += ["compute µs", "worker beyond µs", "redis µs", "redis cmds/call", "redis MiB", "gateway RSS MiB"]
        rows = []
        for p in figures["points"]:
            cpu = p.get("cpu_us_per_request") or {}
            row = [p["label"], num(p["x"], ".3g"), num(p.get("mean_batch"), ".1f"), num(p["ok_per_s"], ".0f")]
            row += [num(p["calls"]["p50_ms"]), num(p["calls"]["p99_ms"]), codes(p["calls"]["errors"])]
            row += [num(cpu.get(hop), ".0f") for hop in SCALING_HOPS]
            row += [num(p.get("model_compute_us_per_request"), ".0f")]
            row += [
                num(p.get("worker_beyond_compute_us_per_request"), ".0f"),
                num(p.get("redis_cpu_us_per_call"), ".0f"),
            ]
            row += [num(p.get("redis_commands_per_call"), ".1f")]
            row += [num((p.get("redis_used_memory_bytes") or math.nan) / 2**20, ".1f")]
            row += [num(((p.get("rss_kib") or {}).get("gateway") or math.nan) / 1024, ".0f")]
            rows.append(row)
        per = figures["per"]
        unit = f"{per:g} {figures['unit']}s" if per != 1 else figures["unit"]
        fit_rows = []
        for name, fitted in figures["fits"].items():
            if fitted is None:
                fit_rows.append([name, "-", "-", "-", "-"])
                continue
            fit_rows.append(
                [
                    name,
                    fitted["kind"],
                    num(fitted["intercept"], ".1f"),
                    num(fitted["slope_per_shown_unit"], ".3g"),
                    num(fitted["spread_ratio"], ".2f"),
                ]
            )
        lines += ["", f"axis {axis} (x: {figures['unit']}):", "", *table(header, rows), ""]
        lines += table(["series", "growth", "at x=0", f"per {unit}", "max/min"], fit_rows)
    return lines


def markdown(result: Figures) -> str:
    """The report of one run's JSON (what ``meshserve bench --json`` writes)."""
    lines = heading(result) + raw_lines(result.get("raw")) + [""]
    if result["scenario"] == "overload":
        lines += overload_lines(result["overload"], result["settings"]["request_timeout_s"])
    elif result["scenario"] == "noisy-neighbor":
        lines += noisy_neighbor_lines(result)
    elif result["scenario"] == "large":
        lines += large_lines(result)
    elif result["scenario"] == "retry-storm":
        lines += retry_storm_lines(result)
    elif result["scenario"] == "rollout":
        lines += rollout_lines(result)
    elif result["scenario"] == "many-models":
        lines += many_models_lines(result)
    elif result["scenario"] == "stream":
        lines += stream_lines(result)
    elif result["scenario"] == "sequences":
        lines += sequences_lines(result)
    elif result["scenario"] == "scale-out":
        lines += scale_out_lines(result)
    elif result["scenario"] == "scaling":
        lines += scaling_lines(result)
    else:
        lines += points_table(result) + hops_lines(result)
    return "\n".join(lines) + "\n"


def plot(result: Figures, path: Path) -> None:
    """p50 and p99 per point (log scales), with raw ONNX Runtime's batch-1 p50 flat."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit("bench: --plot needs matplotlib: pip install 'meshserve[bench]'") from None
    points = result.get("points") or []
    if not points:
        raise SystemExit(f"bench: --plot draws the sweep and open-loop scenarios, not {result['scenario']}")
    figure = Figure(figsize=(7.0, 4.5), layout="constrained")
    axes = figure.add_subplot()
    xs = [point["offered"] for point in points]
    for percentile in ("p50_ms", "p99_ms"):
        axes.plot(xs, [point["calls"][percentile] for point in points], marker="o", label=f"mesh {percentile[:3]}")
    if result.get("raw"):
        axes.axhline(result["raw"]["p50_ms"], linestyle=":", label="raw ONNX Runtime p50")
    axes.set(xscale="log", yscale="log", xlabel="rate/s" if result["scenario"] == "open-loop" else "concurrency")
    axes.set(ylabel="latency, ms", title=f"meshserve {result['scenario']}: {result['model']['name']}")
    axes.set_xticks(xs, [f"{x:g}" for x in xs])
    axes.set_xticks([], minor=True)
    axes.legend()
    figure.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshserve_bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("json_file", type=Path, help="what meshserve bench --json wrote")
    parser.add_argument("--plot", type=Path, help="also write a latency plot (PNG) here")
    args = parser.parse_args(argv)
    result = json.loads(args.json_file.read_text())
    print(markdown(result), end="")
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
