"""``meshserve bench``'s flags and entry point: the stable seam ``meshserve`` dispatches to.

Every flag also reads a ``MESHSERVE_BENCH_*`` variable. A run prints its Markdown report
(:mod:`meshserve_bench.report`) and, with ``--json FILE``, writes every figure there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import signal
from pathlib import Path
from typing import Any

from meshserve.settings import env_default
from meshserve_bench.config import SCALING_AXES, SCENARIOS, BenchConfig


def positive_list(kind: type[int] | type[float]) -> Any:
    """An argparse type: positive ``kind`` values separated by commas, as a tuple."""

    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(kind(part) for part in text.split(","))
        except ValueError:
            values = ()
        if not values or not all(value > 0 and math.isfinite(value) for value in values):
            raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def flag(name: str, default: Any, kind: Any = str, help: str | None = None) -> None:
        variable = "BENCH_" + name.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(name, type=kind, default=env_default(variable, default), help=help)

    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default=env_default("BENCH_SCENARIO", "sweep"),
        help="sweep: concurrencies beside raw ONNX Runtime; open-loop: fixed rates (--rates);"
        " overload: twice the sustainable rate; noisy-neighbor: one tenant floods, another is timed;"
        " large: requests of --sizes MiB, latency beside raw ONNX Runtime and each process's peak memory;"
        " retry-storm: one tenant over its limit retries after each refusal, another is timed;"
        " rollout: a two-version model's split changes under a closed loop of 16 (failed calls, p99);"
        " many-models: 30 models, room for 10, loaded on demand: cold-start waits and the hit ratio;"
        " stream: ModelStreamInfer beside unary at concurrency 1 and 16, and a cache hit beside a miss;"
        " sequences: steps of a stateful model per second, and the latency a step adds over a stateless call;"
        " scale-out: the model on a loopback Redis Cluster with 1 and 3 queue partitions (calls/s, Redis CPU per"
        " call per shard, at the largest --concurrency);"
        " scaling: each hop's cost per request along --axis (batch, concurrency, payload, tenants, models), fitted",
    )
    flag("--target", None, help="HOST:PORT of a running mesh (default: start one)")
    flag("--redis-url", None, help="with --target: that mesh's Redis, to report what each call cost it")
    flag("--model", "cnn")
    flag("--model-repository", None, help="default: the generated example models")
    flag("--concurrency", "1,32", positive_list(int), "sweep: closed-loop clients per point")
    flag("--duration-s", 10.0, float, "measured seconds per point or phase")
    flag("--warmup-s", 2.0, float, "unmeasured seconds before each")
    flag("--channels", None, int, "sweep: connections per point (default: min(concurrency, 8))")
    flag("--max-batch", None, int, "the raw run's largest batch (default: the model's)")
    flag("--json", None, help="write every figure to this file (see python -m meshserve_bench.report)")
    flag("--rates", "50,100,200", positive_list(float), "open-loop: calls per second per point")
    flag("--request-timeout-s", 2.0, float, "open-loop calls' gRPC timeout; overload's deadline")
    flag("--steady-rate-per-s", None, float, "noisy-neighbor, retry-storm: what tenant B sends (default: 50, 40)")
    flag("--noisy-limit-per-s", 40.0, float, "noisy-neighbor: tenant A's rate limit")
    flag("--flood-rate-per-s", None, float, "noisy-neighbor: what tenant A sends (default: 10x its limit)")
    flag("--flood-channels", 8, int, "noisy-neighbor: tenant A's connections")
    flag("--sizes", "1,16,64", positive_list(float), "large: request sizes, MiB")
    flag("--storm-connections", 48, int, "retry-storm: tenant A's connections, one retrying client each")
    flag("--storm-pause-ms", 20.0, float, "retry-storm: tenant A's pause after each refusal")
    flag("--scaling-rate", None, float, "scaling: tenants and models axes open loop at this rate (default: closed)")
    flag("--axis", ",".join(SCALING_AXES), axis_list, "scaling: the axes, one at a time")


def axis_list(text: str) -> tuple[str, ...]:
    """An argparse type: names of ``SCALING_AXES`` separated by commas, as a tuple."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names or any(name not in SCALING_AXES for name in names):
        raise argparse.ArgumentTypeError(
            f"expected some of {', '.join(SCALING_AXES)} separated by commas, got {text!r}"
        )
    return names


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    # onnx builds the example models: loaded when the bench runs, not by every `meshserve` command
    from meshserve.devkit.examples import default_repository_dir, write_example_repository

    steady_rate_per_s = args.steady_rate_per_s or (40.0 if args.scenario == "retry-storm" else 50.0)
    positive = (args.duration_s, args.request_timeout_s, steady_rate_per_s, args.noisy_limit_per_s)
    if min(positive) <= 0 or (args.flood_rate_per_s or 1.0) <= 0 or args.flood_channels < 1 or args.warmup_s < 0:
        raise SystemExit("bench: durations, rates and timeouts must be > 0, --flood-channels >= 1")
    if args.scaling_rate is not None and not args.scaling_rate > 0:
        raise SystemExit("bench: --scaling-rate must be > 0")
    if args.storm_connections < 1 or args.storm_pause_ms < 0:
        raise SystemExit("bench: --storm-connections must be >= 1 and --storm-pause-ms >= 0")
    repository = Path(args.model_repository) if args.model_repository else None
    return BenchConfig(
        scenario=args.scenario,
        target=args.target,
        model=args.model,
        repository=repository or write_example_repository(default_repository_dir()),
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        json_path=Path(args.json) if args.json else None,
        redis_url=args.redis_url if args.target else None,
        concurrencies=args.concurrency,
        channels=args.channels,
        max_batch=args.max_batch,
        rates_per_s=args.rates,
        request_timeout_s=args.request_timeout_s,
        steady_rate_per_s=steady_rate_per_s,
        noisy_limit_per_s=args.noisy_limit_per_s,
        flood_rate_per_s=args.flood_rate_per_s or 10.0 * args.noisy_limit_per_s,
        flood_channels=args.flood_channels,
        sizes_mib=args.sizes,
        storm_connections=args.storm_connections,
        storm_pause_ms=args.storm_pause_ms,
        axes=args.axis,
        scaling_rate_per_s=args.scaling_rate,
    )


def run(args: argparse.Namespace) -> int:
    """Run the scenario, print its report, write ``--json``. Returns 1 when a sweep call
    failed (errors are what the other scenarios measure, and their verdicts are reported)."""
    # Every `meshserve` command builds this module's flags: gRPC, the protos and ONNX
    # Runtime are loaded only when the bench runs, not in a gateway's process.
    from meshserve_bench import (
        large,
        many,
        mesh,
        report,
        rollout,
        scale_out,
        scaling,
        scenarios,
        sequences,
        storm,
        stream,
        tenants,
    )

    config = config_from_args(args)
    signal.signal(signal.SIGTERM, mesh.exit_on_sigterm)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    machine = mesh.machine_info()  # the load average before the bench adds its own
    runners = {
        "noisy-neighbor": tenants.run_noisy_neighbor,
        "large": large.run_large,
        "retry-storm": storm.run_retry_storm,
        "rollout": rollout.run_rollout_bench,
        "many-models": many.run_many_models,
        "stream": stream.run_stream,
        "sequences": sequences.run_sequences,
        "scale-out": scale_out.run_scale_out,
        "scaling": scaling.run_scaling,
    }
    figures = runners.get(config.scenario, scenarios.run_mesh_scenario)(config)
    result = {"scenario": config.scenario, "date": started, "machine": machine, **figures}
    result = json.loads(json.dumps(result, default=str))  # paths as text; the report reads only JSON
    if config.json_path is not None:
        config.json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(report.markdown(result), flush=True)
    errors = any(point["calls"]["errors"] for point in result.get("points", ()))
    if config.scenario == "scaling":  # a failed call there means a point measured something else
        errors = any(p["calls"]["errors"] for axis in result["axes"].values() for p in axis["points"])
        return 1 if errors else 0
    if config.scenario == "rollout" and result["rollout"]["failed_calls"]:
        return 1
    return 1 if config.scenario == "sweep" and errors else 0
