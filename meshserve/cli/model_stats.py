"""``meshserve models stats [NAME]``: Triton's ModelStatistics as a table.

``meshserve models`` (meshserve/cli/models.py) asks a gateway what tritonclient's
``get_inference_statistics`` asks; this module prints one line per model version: requests
answered and failed, items and batches, mean queue and infer time per request,
then one line per batch size with its mean compute times per batch. The figures
are cumulative, summed over workers (docs/lifecycle.md#statistics).
"""

from __future__ import annotations

from protos import grpc_service_pb2 as pb

HEADER = ("MODEL", "VERSION", "REQUESTS", "FAILED", "ITEMS", "BATCHES", "QUEUE MS", "INFER MS", "LAST (UNIX MS)")


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
