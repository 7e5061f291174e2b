"""The pure parts of ``meshserve bench``: percentiles, ratios, inputs, the table.

No servers and no timing: every figure here is given, except one test that runs
a real example model through the worker's session class and checks only that it ran.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest

from meshserve.models.repository import ModelInfo, TensorInfo, load_model
from meshserve_bench import sweep as bench

RAW = bench.RawFigures(p50_ms=1.0, p99_ms=1.5, items_per_s_by_batch={1: 1000.0, 8: 1600.0, 32: 2000.0})


def _point(
    concurrency: int, requests: int, cpu_s: float = 1.0, errors: dict[str, int] | None = None
) -> bench.PointFigures:
    return bench.PointFigures(
        concurrency=concurrency,
        channels=min(concurrency, 8),
        duration_s=10.0,
        requests=requests,
        p50_ms=3.0,
        p99_ms=5.5,
        errors=errors or {},
        client_cpu_s=cpu_s,
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


def test_percentile_interpolates_and_converts_ns_to_ms() -> None:
    latencies_ns = [1_000_000, 2_000_000, 3_000_000, 4_000_000]
    assert bench.percentile_ms(latencies_ns, 50) == pytest.approx(2.5)
    assert bench.percentile_ms(latencies_ns, 100) == pytest.approx(4.0)
    assert bench.percentile_ms([7_000_000], 99) == pytest.approx(7.0)


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(bench.percentile_ms([], 50))


def test_best_batch_is_the_highest_throughput() -> None:
    assert RAW.best_batch() == 32
    assert RAW.best_items_per_s() == 2000.0


def test_compare_divides_by_best_batch_and_subtracts_batch1_latency() -> None:
    vs = bench.compare(_point(32, requests=10_000), RAW)
    assert vs.throughput_ratio == pytest.approx(0.5)  # 1000 req/s over 2000 items/s
    assert vs.added_p50_ms == pytest.approx(2.0)
    assert vs.added_p99_ms == pytest.approx(4.0)


def test_raw_batches_include_8_only_between_1_and_max() -> None:
    assert bench.raw_batches(32) == [1, 8, 32]
    assert bench.raw_batches(8) == [1, 8]
    assert bench.raw_batches(4) == [1, 4]
    assert bench.raw_batches(1) == [1]


def test_random_inputs_fill_batch_and_symbolic_dims() -> None:
    arrays = bench.random_inputs(_model((-1, 3, -1), max_batch_size=32), batch=4)
    assert arrays["x"].shape == (4, 3, 32)
    assert arrays["x"].dtype == np.float32


def test_random_inputs_keep_a_fixed_dim_0_when_not_batchable() -> None:
    arrays = bench.random_inputs(_model((1, 4), max_batch_size=0, datatype="INT64"), batch=8)
    assert arrays["x"].shape == (1, 4)
    assert arrays["x"].dtype == np.int64


def test_request_names_model_version_and_carries_raw_bytes() -> None:
    request = bench.build_request(_model((-1, 3, 2, 2), max_batch_size=32))
    assert (request.model_name, request.model_version) == ("m", "3")
    assert list(request.inputs[0].shape) == [1, 3, 2, 2]
    assert request.inputs[0].datatype == "FP32"
    assert len(request.raw_input_contents[0]) == 12 * 4


def test_report_table_with_given_figures() -> None:
    machine = {"cores": 2, "platform": "Linux-test"}
    points = [_point(1, requests=5000, cpu_s=2.0), _point(32, requests=10_000, cpu_s=9.5, errors={"UNAVAILABLE": 3})]
    assert bench.format_report("cnn", 10.0, machine, RAW, points).splitlines() == [
        "model cnn, 10 s per point, machine: 2 cores, Linux-test",
        "raw ONNX Runtime: batch 1 p50 1.00 ms p99 1.50 ms, 1000 items/s; batch 8: 1600 items/s;"
        " batch 32: 2000 items/s (best)",
        "concurrency  req/s  p50 ms  p99 ms  errors  x raw best  +p50 ms  +p99 ms  client cpu",
        "1            500    3.00    5.50    0       0.25        +2.00    +4.00    0.20",
        "32           1000   3.00    5.50    3       0.50        +2.00    +4.00    0.95",
        "concurrency 32: errors UNAVAILABLE 3",
        "concurrency 32: client CPU-bound: figures are a lower bound",
    ]


def test_the_report_shows_raw_batch_1_after_an_idle_gap_when_measured() -> None:
    raw = bench.RawFigures(p50_ms=1.0, p99_ms=1.5, items_per_s_by_batch={1: 1000.0}, idle_p50_ms=2.25)
    lines = bench.format_report("cnn", 10.0, {"cores": 2, "platform": "Linux-test"}, raw, []).splitlines()
    assert "raw batch 1 after 4 ms idle (how a lone request finds it): p50 2.25 ms" in lines


def test_the_report_shows_the_worker_session_figure_when_measured() -> None:
    raw = bench.RawFigures(
        p50_ms=1.0, p99_ms=1.5, items_per_s_by_batch={1: 1000.0}, idle_p50_ms=1.25, worker_idle_p50_ms=1.75
    )
    lines = bench.format_report("cnn", 10.0, {"cores": 2, "platform": "Linux-test"}, raw, []).splitlines()
    assert "raw batch 1 after 4 ms idle on a worker's session (idle threads sleep): p50 1.75 ms" in lines
    no_worker_line = bench.format_report("cnn", 10.0, {"cores": 2, "platform": "Linux-test"}, RAW, [])
    assert "worker's session" not in no_worker_line


def test_the_worker_session_runs_the_real_model_unless_the_worker_spins(
    model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real ONNX Runtime on the example mlp, through the worker's own session class."""
    model = load_model(model_repository / "mlp", 1)
    monkeypatch.delenv("MESHSERVE_INTRA_OP_SPINNING", raising=False)
    runs_ns = bench._worker_session_idle_runs_ns(model, warmup_s=0.0, duration_s=0.05)
    assert runs_ns
    assert all(ns > 0 for ns in runs_ns)
    monkeypatch.setenv("MESHSERVE_INTRA_OP_SPINNING", "1")  # then the default session's figure is the worker's
    assert bench._worker_session_idle_runs_ns(model, warmup_s=0.0, duration_s=0.05) == []


@pytest.mark.parametrize("text", ["", "0", "1,x", "4,-1"])
def test_concurrency_list_rejects_bad_values(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        bench._concurrency_list(text)


def test_concurrency_list_parses_commas() -> None:
    assert bench._concurrency_list("1,8,32") == (1, 8, 32)


def test_report_notes_a_busy_machine() -> None:
    machine = {"cores": 2, "platform": "Linux-test", "other_cores_during_raw": 1.2}
    lines = bench.format_report("cnn", 10.0, machine, RAW, [_point(1, requests=5000)]).splitlines()
    assert "note: other processes kept 1.2 cores busy during the raw run: figures are noisy" in lines
