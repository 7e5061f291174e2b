"""Structured logs: the JSON formatter, the --log-format flag, and the per-request and
per-batch lines a real mesh writes, joined to their traces by trace id."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from meshserve.cli.main import build_parser
from meshserve.observe.logs import JsonFormatter
from tests.support import infer_request, infer_stub, start_mesh, stop_mesh

log = logging.getLogger("tests.logging")


def record(message: str, *args: Any, extra: dict[str, Any] | None = None, exc: bool = False) -> logging.LogRecord:
    return log.makeRecord(
        log.name, logging.WARNING, __file__, 1, message, args, sys.exc_info() if exc else None, extra=extra
    )


def test_a_record_is_one_json_line_with_time_level_service_logger_and_message() -> None:
    line = JsonFormatter("gateway").format(record("model %s refused", "mlp", extra={"tenant": "a", "took_ms": 1.5}))
    assert "\n" not in line
    fields = json.loads(line)
    assert fields.pop("time").endswith("Z")
    assert fields == {
        "level": "WARNING",
        "service": "gateway",
        "logger": "tests.logging",
        "message": "model mlp refused",
        "tenant": "a",
        "took_ms": 1.5,
    }


def test_time_is_rfc3339_utc_to_the_millisecond() -> None:
    entry = record("x")
    entry.created = 1_700_000_000.1234
    fields = json.loads(JsonFormatter("worker").format(entry))
    assert fields["time"] == "2023-11-14T22:13:20.123Z"
    assert datetime.fromisoformat(fields["time"]).timestamp() == pytest.approx(1_700_000_000.123)


def test_the_current_span_gives_trace_and_span_ids_in_hex() -> None:
    tracer = TracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("request") as span:
        fields = json.loads(JsonFormatter("gateway").format(record("inside")))
    context = span.get_span_context()
    assert fields["trace_id"] == f"{context.trace_id:032x}"
    assert fields["span_id"] == f"{context.span_id:016x}"
    outside = json.loads(JsonFormatter("gateway").format(record("outside")))
    assert "trace_id" not in outside
    assert "span_id" not in outside


def test_an_exception_travels_as_its_traceback_and_odd_values_as_strings() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        entry = record("failed", extra={"path": Path("/m/x.onnx")}, exc=True)
    fields = json.loads(JsonFormatter("worker").format(entry))
    assert "ValueError: boom" in fields["exc"]
    assert fields["path"] == "/m/x.onnx"


def test_log_format_is_a_flag_for_every_service_with_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    assert parser.parse_args(["gateway"]).log_format == "text"
    assert parser.parse_args(["--log-format", "json", "worker", "--model-repository", "/m"]).log_format == "json"
    monkeypatch.setenv("MESHSERVE_LOG_FORMAT", "json")
    assert build_parser().parse_args(["router", "--model-repository", "/m"]).log_format == "json"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-format", "xml", "gateway"])


# ------------------------------------------------------------ lines from a real mesh


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The gateway servicer's and the worker's DEBUG lines, as JSON, into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("mesh"))
    loggers = {
        logging.getLogger("gateway.servicer"): logging.DEBUG,
        logging.getLogger("model_workers.runner"): logging.DEBUG,
    }
    levels = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.addHandler(handler)
        logger.setLevel(level)
    try:
        yield stream
    finally:
        for logger, level in levels.items():
            logger.removeHandler(handler)
            logger.setLevel(level)


async def test_one_line_per_request_and_per_batch_carry_their_trace_ids(
    redis: Redis, redis_url: str, model_repository: Path, json_lines: io.StringIO
) -> None:
    import grpc

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mesh = await start_mesh(redis_url, model_repository, tracer=provider.get_tracer("tests"))
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            features = {"features": np.ones((2, 64), np.float32)}
            await stub.ModelInfer(infer_request("mlp", features, request_id="req-7"), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ModelInfer(infer_request("nope", {"x": np.ones(1, np.float32)}), timeout=10)
    finally:
        await stop_mesh(mesh)
        provider.shutdown()
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    requests = [line for line in lines if line["logger"] == "gateway.servicer" and line["level"] == "DEBUG"]
    batches = [line for line in lines if line["logger"] == "model_workers.runner" and "batch_size" in line]
    spans = {
        (span.name, (span.attributes or {}).get("meshserve.model")): span for span in exporter.get_finished_spans()
    }

    assert [(r["model"], r["tenant"], r["code"]) for r in requests] == [
        ("mlp", "dev", "OK"),
        ("nope", "dev", "NOT_FOUND"),
    ]
    assert all(r["duration_ms"] > 0 for r in requests)
    request_span = spans["ModelInfer", "mlp"].get_span_context()
    assert requests[0]["trace_id"] == f"{request_span.trace_id:032x}"

    [batch] = batches
    assert batch["level"] == "DEBUG"
    assert (batch["model"], batch["version"], batch["batch_size"], batch["requests"]) == ("mlp", 1, 2, 1)
    assert batch["compute_ms"] > 0
    assert batch["queue_wait_ms"] >= 0
    assert batch["request_ids"] == ["req-7"]  # the id the caller sent, to find its batch
    assert batch["trace_id"] == f"{spans['batch', 'mlp'].get_span_context().trace_id:032x}"
