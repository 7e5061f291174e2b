"""Triton's model statistics, counted by the worker for one model version.

Cumulative since the version was loaded on this worker (its :class:`Served`), sent
in every report (``ModelState.statistics``); the router sums them over workers.
The figures follow Triton's ``ModelStatistics``:

- ``inference_count``: batch items computed, ``execution_count``: batches run;
- per request: ``success`` (enqueue to reply handed to the writer, whole duration),
  ``fail`` (the worker answered it with an error: expired in the queue, stopped at
  a time limit, the model failed, outputs over the size limit), and, for successful
  ones, ``queue`` (enqueue to claim, the batching delay included),
  ``compute_input`` (the batch's inputs stacked into one feed), ``compute_infer``
  (the ONNX Runtime run) and ``compute_output`` (outputs cut into replies): each
  request of a batch counts its batch's whole duration, as Triton does;
- per batch size (items): the same three compute durations, counted once a batch.

The hot path only adds integers: no allocation per request, one small object per
new batch size. Times are nanoseconds (queue times come from the gateway's
enqueue clock in ms, so they carry its clock's skew against this host's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos import grpc_service_pb2 as pb


@dataclass(slots=True)
class BatchSizeFigures:
    """Batches of one size: how many, and their summed compute durations (ns)."""

    count: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0


@dataclass(slots=True)
class ModelStatistics:
    """Counters of one model version on this worker (see the module's docstring)."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0  # Unix ms of the last batch's end (successful or not)
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0  # over successful requests (count: success_count)
    input_ns: int = 0  # the same three: a batch's duration counted once per request
    infer_ns: int = 0
    output_ns: int = 0
    by_batch_size: dict[int, BatchSizeFigures] = field(default_factory=dict)

    def batch_succeeded(
        self,
        items: int,
        requests: int,
        *,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        ended_ns: int,
        claimed_ns: int,
    ) -> None:
        """A batch of ``items`` from ``requests`` requests was answered; ``queue_ns``
        is the requests' summed queue time, ``claimed_ns`` and ``ended_ns`` (Unix ns)
        when it was claimed and its replies were ready."""
        self.inference_count += items
        self.execution_count += 1
        self.last_inference_ms = ended_ns // 1_000_000
        self.success_count += requests
        self.success_ns += queue_ns + requests * (ended_ns - claimed_ns)
        self.queue_ns += queue_ns
        self.input_ns += requests * input_ns
        self.infer_ns += requests * infer_ns
        self.output_ns += requests * output_ns
        figures = self.by_batch_size.get(items)
        if figures is None:
            figures = self.by_batch_size[items] = BatchSizeFigures()
        figures.count += 1
        figures.input_ns += input_ns
        figures.infer_ns += infer_ns
        figures.output_ns += output_ns

    def requests_failed(self, requests: int, enqueued_ms_sum: int, now_ns: int) -> None:
        """``requests`` requests, enqueued at ``enqueued_ms_sum`` (their Unix ms
        summed), were answered with an error at ``now_ns`` (Unix ns)."""
        self.fail_count += requests
        self.fail_ns += max(0, requests * now_ns - enqueued_ms_sum * 1_000_000)
        self.last_inference_ms = now_ns // 1_000_000

    def expired_unread(self, requests: int, now_ms: int) -> None:
        """``requests`` requests the claim found past their deadline and answered
        without reading them: counted in ``fail``, their durations unknown (0 ns)."""
        self.fail_count += requests
        self.last_inference_ms = now_ms

    def to_proto(self, name: str, version: int) -> pb.ModelStatistics:
        """Triton's message for this version."""
        duration = pb.StatisticDuration
        succeeded = self.success_count
        return pb.ModelStatistics(
            name=name,
            version=str(version),
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=duration(count=succeeded, ns=self.success_ns),
                fail=duration(count=self.fail_count, ns=self.fail_ns),
                queue=duration(count=succeeded, ns=self.queue_ns),
                compute_input=duration(count=succeeded, ns=self.input_ns),
                compute_infer=duration(count=succeeded, ns=self.infer_ns),
                compute_output=duration(count=succeeded, ns=self.output_ns),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=duration(count=f.count, ns=f.input_ns),
                    compute_infer=duration(count=f.count, ns=f.infer_ns),
                    compute_output=duration(count=f.count, ns=f.output_ns),
                )
                for size, f in sorted(self.by_batch_size.items())
            ],
        )
