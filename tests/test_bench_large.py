"""``meshserve bench --scenario large``'s parts: calls against the in-process mesh, the
mesh's processes by role and their peak memory from /proc, the report's table."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from meshserve_bench import large, report
from meshserve_bench.config import BenchConfig
from meshserve_bench.mesh import find_model
from protos import grpc_service_pb2 as pb


def test_a_size_in_mib_is_a_square_image_of_that_many_bytes() -> None:
    assert large.image(16).nbytes == 16 * large.MIB
    assert large.image(1).shape == (1, 1, 512, 512)


async def test_calls_one_at_a_time_against_the_mesh(mesh: Any, model_repository: Path) -> None:
    model = find_model(model_repository, large.MODEL)
    array = large.image(0.25)
    request = pb.ModelInferRequest(model_name=model.name)
    request.inputs.add(name=model.inputs[0].name, datatype="FP32", shape=array.shape)
    request.raw_input_contents.append(array.tobytes())
    config = BenchConfig(
        scenario="large",
        target=mesh.address,
        model=model.name,
        repository=model_repository,
        duration_s=0.01,
        warmup_s=0.0,
    )
    latencies_ns, errors = await large.mesh_calls(mesh.address, request, config)
    assert errors == 0
    assert len(latencies_ns) >= large.MIN_CALLS


def test_processes_are_found_by_role_and_their_peaks_read() -> None:
    code = "import sys; print('up', flush=True); sys.stdin.read()"
    child = subprocess.Popen(
        [sys.executable, "-c", code, "meshserve", "worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdout is not None
    assert child.stdout.readline() == b"up\n"  # running: its command line is readable
    try:
        roles = large.role_pids([child.pid])
        large.reset_peaks([child.pid])
        peak = large.peak_kib([child.pid])
    finally:
        child.communicate(b"")
    assert roles == {"gateway": [], "worker": [child.pid], "redis": []}
    assert peak > 0


def test_the_report_has_a_row_per_size() -> None:
    size = large.SizeFigures(
        16.0, 16 * large.MIB, 5, 0, 30.0, 40.0, 2.0, {"gateway": 1024}, {"gateway": 1024 + 32768}, 12.5
    )
    result = {
        "scenario": "large",
        "date": "2026-12-04T00:00:00+00:00",
        "machine": {
            "cores": 2,
            "processor": "x",
            "platform": "p",
            "python": "3.11",
            "onnxruntime": "1",
            "load_average_1m": 0.5,
        },
        "settings": {"target": None, "duration_s": 1.0, "warmup_s": 0.0},
        "model": {"name": "scale_any", "version": 1},
        "sizes": [{**asdict(size), "added_p50_ms": size.added_p50_ms(), "peak_over_payload": size.peak_over_payload()}],
    }
    text = report.markdown(result)
    assert "| 16 | 5 | 0 | 30.0 | 40.0 | 2.0 | 28.0 | 12.5 | 33 (2.0x) |" in text


async def test_grpcs_own_floor_is_an_echo_of_the_same_bytes() -> None:
    assert await large.echo_p50_ms(bytes(1 << 20), 3) > 0
