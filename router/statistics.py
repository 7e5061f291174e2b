"""Triton's model statistics for the whole mesh: workers' figures summed.

Each worker reports, per model version it holds, its statistics cumulative since it
loaded that version (``ModelState.statistics``, :mod:`model_workers.statistics`).
The book keeps each worker's last report and answers the sum over workers, plus
what workers counted before they let a version go:

- a version missing from a worker's new report (dropped, moved elsewhere) has its
  last figures folded into the retired totals;
- figures that went backwards (the worker dropped and loaded the version again
  between two reports) fold the old ones in first;
- a worker that stops reporting keeps its last figures: totals never go back.

So counts only grow while the router runs; the figures of a worker's last report
interval before it stops are lost, and a router restart starts from what the live
workers hold. The book grows by one small message per model version per worker id
seen (ids are unique per worker process) until the router restarts. Off the hot
path: a report costs a dict per worker, a query sums messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from meshserve.errors import NotFound
from protos import grpc_service_pb2 as pb
from router.placement import ModelKey

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
"""The ``InferStatistics`` fields the workers fill (Triton's cache fields stay 0)."""

BATCH_DURATIONS = ("compute_input", "compute_infer", "compute_output")

PHASES = ("queue", *BATCH_DURATIONS)


class StatisticsBook:
    """Owns every worker's last statistics and the retired totals."""

    def __init__(self) -> None:
        self._last: dict[str, dict[ModelKey, pb.ModelStatistics]] = {}  # worker id -> version -> last figures
        self._retired: dict[ModelKey, pb.ModelStatistics] = {}

    def record(self, worker_id: str, reported: Mapping[ModelKey, pb.ModelStatistics]) -> None:
        """A worker's report: its cumulative figures per model version it holds.

        Every dict and message published here is replaced whole, never changed, so
        the metrics thread (``StatisticsCollector``) reads them without a lock."""
        retired: dict[ModelKey, pb.ModelStatistics] | None = None
        for key, old in self._last.get(worker_id, {}).items():
            new = reported.get(key)
            if new is None or went_back(old, new):
                retired = dict(self._retired) if retired is None else retired
                summed = pb.ModelStatistics()
                if (before := retired.get(key)) is not None:
                    summed.CopyFrom(before)
                add(summed, old)
                retired[key] = summed
        if retired is not None:
            self._retired = retired
        self._last[worker_id] = dict(reported)

    def totals(self, keys: Iterable[ModelKey]) -> list[pb.ModelStatistics]:
        """Triton's message per version in ``keys`` (in that order): summed over
        workers, the retired figures included; zeros for one never served."""
        wanted = {key: pb.ModelStatistics(name=key[0], version=str(key[1])) for key in keys}
        for zero in wanted.values():  # present even when zero, as Triton answers
            for name in DURATIONS:
                getattr(zero.inference_stats, name).SetInParent()
        for per_worker in (self._retired, *list(self._last.values())):
            for key, figures in per_worker.items():
                if (summed := wanted.get(key)) is not None:
                    add(summed, figures)
        for summed in wanted.values():
            by_size(summed)
        return list(wanted.values())


class StatisticsCollector(Collector):
    """The book's totals as Prometheus counters, mesh-wide (a worker's own figures
    are its ``meshserve_worker_*`` metrics); read in the metrics thread at scrape."""

    def __init__(self, book: StatisticsBook, models: Callable[[], Iterable[ModelKey]]) -> None:
        self.book = book
        self.models = models

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        items = CounterMetricFamily(
            "meshserve_model_inferences", "Batch items computed, all workers (Triton's inference_count).", labels=labels
        )
        batches = CounterMetricFamily(
            "meshserve_model_executions", "Batches run, all workers (Triton's execution_count).", labels=labels
        )
        requests = CounterMetricFamily(
            "meshserve_model_requests",
            "Requests workers answered, by outcome: success, or fail (answered with an error).",
            labels=[*labels, "outcome"],
        )
        phases = CounterMetricFamily(
            "meshserve_model_phase_seconds",
            "Summed over successful requests: queue, compute_input, compute_infer, compute_output"
            " (a batch's compute time counts once per request of it, as in Triton).",
            labels=[*labels, "phase"],
        )
        for stats in self.book.totals(sorted(self.models())):
            names = [stats.name, stats.version]
            infer = stats.inference_stats
            items.add_metric(names, stats.inference_count)
            batches.add_metric(names, stats.execution_count)
            requests.add_metric([*names, "success"], infer.success.count)
            requests.add_metric([*names, "fail"], infer.fail.count)
            for phase in PHASES:
                phases.add_metric([*names, phase], getattr(infer, phase).ns / 1e9)
        yield from (items, batches, requests, phases)


def requested(known: Iterable[ModelKey], name: str, version: str) -> list[ModelKey]:
    """The versions a ``ModelStatisticsRequest`` asks for, as Triton reads it: an empty
    ``name`` every model, an empty ``version`` every version of ``name``. NotFound for
    a model or version the repository does not have."""
    keys = sorted(known)
    if not name:
        return keys
    versions = [key for key in keys if key[0] == name]
    if not versions:
        raise NotFound(f"unknown model '{name}'")
    if not version:
        return versions
    chosen = [key for key in versions if str(key[1]) == version]
    if not chosen:
        raise NotFound(f"unknown version '{version}' of model '{name}'")
    return chosen


def went_back(old: pb.ModelStatistics, new: pb.ModelStatistics) -> bool:
    """Whether ``new`` counts less than ``old``: a fresh count, not a continuation."""
    return (
        new.execution_count < old.execution_count
        or new.inference_count < old.inference_count
        or new.inference_stats.fail.count < old.inference_stats.fail.count
    )


def add(total: pb.ModelStatistics, figures: pb.ModelStatistics) -> None:
    """Add ``figures`` into ``total`` (name and version stay ``total``'s)."""
    total.inference_count += figures.inference_count
    total.execution_count += figures.execution_count
    total.last_inference = max(total.last_inference, figures.last_inference)
    for name in DURATIONS:
        into, more = getattr(total.inference_stats, name), getattr(figures.inference_stats, name)
        into.count += more.count
        into.ns += more.ns
    sizes = {batch.batch_size: batch for batch in total.batch_stats}
    for batch in figures.batch_stats:
        into_batch = sizes.get(batch.batch_size)
        if into_batch is None:
            into_batch = sizes[batch.batch_size] = total.batch_stats.add(batch_size=batch.batch_size)
        for name in BATCH_DURATIONS:
            into, more = getattr(into_batch, name), getattr(batch, name)
            into.count += more.count
            into.ns += more.ns


def by_size(total: pb.ModelStatistics) -> None:
    """Order ``total``'s batch statistics by batch size (workers add sizes in any order)."""
    ordered = sorted(total.batch_stats, key=lambda batch: batch.batch_size)
    copies = [pb.InferBatchStatistics() for _ in ordered]
    for copy, batch in zip(copies, ordered, strict=True):
        copy.CopyFrom(batch)
    del total.batch_stats[:]
    total.batch_stats.extend(copies)
