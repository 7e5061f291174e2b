"""``meshserve bench --scenario scaling``'s parts: the fit's verdicts, a tiny sweep of two
points against the in-process mesh (Redis's own counters), fitted and reported, the
tenants file and the repository of many models it writes. Short windows, no timed
assertion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from meshserve.models.repository import scan_repository
from meshserve.tenancy.tenants import load_tenants
from meshserve_bench import cli, report, scaling
from meshserve_bench.config import BenchConfig
from meshserve_bench.fit import fit
from meshserve_bench.hops import HopUsage
from meshserve_bench.mesh import find_model


def test_a_flat_series_is_flat_within_its_noise() -> None:
    result = fit([1, 100, 10000], [500.0, 540.0, 510.0], noise_floor=30.0)
    assert result is not None
    assert result.kind == "flat"


def test_a_linear_series_gives_its_constant() -> None:
    result = fit([1, 100, 1000, 10000], [500.0 + 0.05 * x for x in (1, 100, 1000, 10000)], noise_floor=30.0)
    assert result is not None
    assert result.kind == "linear"
    assert result.slope == pytest.approx(0.05)
    assert result.intercept == pytest.approx(500.0)


def test_a_falling_series_and_a_convex_one() -> None:
    falling = fit([1, 2, 3], [900.0, 500.0, 300.0])
    convex = fit([1, 10, 20, 40], [100.0 + x**3 for x in (1, 10, 20, 40)])
    assert falling is not None
    assert falling.kind == "falling"
    assert convex is not None
    assert convex.kind == "super-linear"


def test_too_few_points_or_no_spread_of_x_is_no_fit() -> None:
    assert fit([1], [1.0]) is None
    assert fit([2, 2], [1.0, 3.0]) is None
    assert fit([1, 2, float("nan")], [1.0, 2.0, 3.0]) is not None  # the NaN point is left out


async def test_a_tiny_sweep_is_measured_fitted_and_reported(mesh: Any, model_repository: Path, redis: Redis) -> None:
    model = find_model(model_repository, "mlp")
    config = BenchConfig(
        scenario="scaling", target=None, model="mlp", repository=model_repository, duration_s=0.3, warmup_s=0.0
    )
    points = []
    for items in (1, 4):
        jobs = [scaling.Job(scaling.request_bytes(model, batch=items))]
        assert await scaling.send_each_once(mesh.address, jobs * 3, concurrency=2) == {}
        figures = await scaling.measure(mesh.address, jobs, config, 2, redis, pids=[])
        assert figures["calls"]["errors"] == {}
        assert figures["calls"]["ok"] > 0
        assert figures["redis_commands_per_call"] > 1
        assert figures["redis_used_memory_bytes"] > 0
        points.append({"x": float(items), "label": f"{items} items", "concurrency": 2, **figures})
    fits = scaling.fit_axis("batch", points)
    assert fits["redis cmds/call"] is not None
    assert fits["redis cmds/call"]["kind"] in ("flat", "falling", "linear", "super-linear")
    assert fits["gateway µs"] is None  # no process of the mesh's was given: not measured
    result = {
        "scenario": "scaling",
        "date": "2026-12-04T10:00:00+00:00",
        "machine": {"cores": 2, "processor": "x86_64", "platform": "test", "python": "3.11", "onnxruntime": "1"},
        "settings": {"target": None, "duration_s": 0.3, "warmup_s": 0.0},
        "model": {"name": "mlp", "version": 1, "max_batch_size": 32},
        "axes": {"batch": {"unit": scaling.UNITS["batch"], "per": 1.0, "points": points, "fits": fits}},
    }
    result["machine"]["load_average_1m"] = 0.5
    text = report.markdown(json.loads(json.dumps(result)))
    assert "axis batch (x: item per request)" in text
    assert "| 4 items | 4 |" in text
    assert "| redis cmds/call | " in text


async def test_an_open_loop_point_cycles_its_calls_at_the_rate(mesh: Any, model_repository: Path) -> None:
    model = find_model(model_repository, "mlp")
    jobs = [scaling.Job(scaling.request_bytes(model, batch=items)) for items in (1, 2)]
    window = scaling.Window.after(0.0, 0.4)
    point = await scaling.measure_jobs(mesh.address, jobs, window, concurrency=1, redis=None, rate_per_s=25.0)
    assert point.calls.errors == {}
    assert point.calls.ok > 0
    assert point.offered == 25.0
    assert point.sent > 0
    assert point.send_lag_p99_ms is not None


def test_the_tenants_file_holds_every_key_hashed(tmp_path: Path) -> None:
    keys = [f"key-{i}" for i in range(50)]
    path = tmp_path / "tenants.yaml"
    path.write_text(scaling.tenants_yaml(keys, "mlp"))
    assert "key-7" not in path.read_text()
    registry = load_tenants(path)
    assert len(registry) == 50
    tenant = registry.authenticate("key-49")
    assert tenant is not None
    assert (tenant.name, tenant.models) == ("t00049", ("mlp",))


def test_the_models_are_copies_placed_on_the_cpu(tmp_path: Path) -> None:
    names = scaling.write_models(tmp_path, 3)
    models, problems = scan_repository(tmp_path)
    assert problems == []
    assert sorted(model.name for model in models) == names == ["m000", "m001", "m002"]


def test_the_axes_flag() -> None:
    assert cli.axis_list("tenants, models") == ("tenants", "models")
    with pytest.raises(Exception, match="expected some of"):
        cli.axis_list("tenants,colors")


def test_the_mean_batch_comes_with_the_hops_usage() -> None:
    assert HopUsage({"worker": 1.0}, 0.5, batch_items=30.0, batches=10.0).per_request(10)["mean_batch"] == 3.0
    assert "mean_batch" not in HopUsage({"worker": 1.0}, 0.5).per_request(10)
