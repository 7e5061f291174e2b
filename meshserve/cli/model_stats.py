"""``meshserve models stats [NAME]``: Triton's ModelStatistics as a table.

Asks a gateway (``--target``, plaintext gRPC) what tritonclient's
``get_inference_statistics`` asks, and prints one line per model version: requests
answered and failed, items and batches, mean queue and infer time per request,
then one line per batch size with its mean compute times per batch. The figures
are cumulative, summed over workers (docs/lifecycle.md#statistics).
"""

from __future__ import annotations

import argparse
import sys

import grpc

from meshserve.settings import env_default
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:8001"
"""`meshserve up`'s gateway."""

HEADER = ("MODEL", "VERSION", "REQUESTS", "FAILED", "ITEMS", "BATCHES", "QUEUE MS", "INFER MS", "LAST (UNIX MS)")


def add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    """``models stats``'s flags (``MESHSERVE_TARGET``, ``MESHSERVE_API_KEY``)."""
    parser.add_argument("name", nargs="?", default="", help="one model (default: every model the key may use)")
    parser.add_argument("--model-version", default="", help="one version of NAME (default: all)")
    parser.add_argument("--target", default=env_default("TARGET", DEFAULT_TARGET), help="the gateway's HOST:PORT")
    parser.add_argument("--api-key", default=env_default("API_KEY", None), help="sent as 'authorization: Bearer'")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="the call's deadline")
    parser.set_defaults(func=cmd_models_stats)


def cmd_models_stats(args: argparse.Namespace) -> int:
    request = pb.ModelStatisticsRequest(name=args.name, version=args.model_version)
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    with grpc.insecure_channel(args.target) as channel:
        try:
            answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                request, metadata=metadata, timeout=args.timeout_s
            )
        except grpc.RpcError as exc:
            print(f"meshserve models stats: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(format_table(answer))
    return 0


def format_table(answer: pb.ModelStatisticsResponse) -> str:
    """The table: a line per model version, an indented line per batch size."""
    rows: list[tuple[str, ...]] = [HEADER]
    for stats in answer.model_stats:
        infer = stats.inference_stats
        rows.append(
            (
                stats.name,
                stats.version,
                str(infer.success.count),
                str(infer.fail.count),
                str(stats.inference_count),
                str(stats.execution_count),
                _mean_ms(infer.queue),
                _mean_ms(infer.compute_infer),
                str(stats.last_inference) if stats.last_inference else "-",
            )
        )
        for batch in stats.batch_stats:
            rows.append(
                (
                    f"  batch {batch.batch_size}",
                    "",
                    "",
                    "",
                    str(batch.batch_size * batch.compute_infer.count),
                    str(batch.compute_infer.count),
                    f"in {_mean_ms(batch.compute_input)}",
                    _mean_ms(batch.compute_infer),
                    f"out {_mean_ms(batch.compute_output)}",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _mean_ms(duration: pb.StatisticDuration) -> str:
    return f"{duration.ns / duration.count / 1e6:.3f}" if duration.count else "-"
