"""A stateful model's batch on the worker: the state and control inputs it is fed,
the steps that cannot run, and the new states its outputs give.

The worker keeps no state between batches: each claimed step comes with its
sequence's state from Redis (:class:`meshserve.queue.ClaimedStep`), and the new one
goes back in the same script as its reply and ack (``SEQ_REPLY_ACK``), so any
worker can run a sequence's next step, and a worker that dies mid-step loses
nothing. A state is the state outputs' bytes of one item, in config order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from meshserve.errors import InvalidArgument
from meshserve.models.repository import ModelInfo
from meshserve.models.sequence import SequenceConfig, SequenceControl, SequenceState
from meshserve.queue.keys import member_sequence_id
from meshserve.queue.sequences import END, KEEP_STATE, START, WRITE_STATE, StateWrite, not_live_message
from meshserve.wire.dtypes import NUMPY_BY_KSERVE
from meshserve.wire.envelope import failed_reply
from protos import meshserve_pb2 as mpb

if TYPE_CHECKING:  # model_workers.session imports this module, and batches imports the session's
    from model_workers.batches import Job

Array = np.ndarray[Any, Any]


def refuse_not_live(info: ModelInfo, jobs: list[Job]) -> tuple[list[Job], list[tuple[Job, mpb.InferReply]]]:
    """The steps that can run, and the refusals of those whose sequence is not live
    (it ended or was idle past its timeout after the gateway admitted the step)."""
    runnable: list[Job] = []
    refused: list[tuple[Job, mpb.InferReply]] = []
    idle_s = info.sequence.idle_timeout_s if info.sequence is not None else 0.0
    for job in jobs:
        if job.step is not None and job.step.state is None:
            message = not_live_message(info.name, member_sequence_id(job.step.member), idle_s)
            refused.append((job, failed_reply(job.job_id, InvalidArgument(message))))
        else:
            runnable.append(job)
    return runnable, refused


def step_feeds(config: SequenceConfig, jobs: list[Job], batching: bool) -> dict[str, Array]:
    """The state and control inputs of a batch of steps, one item per step."""
    feeds: dict[str, Array] = {}
    for state in config.states:
        index = config.states.index(state)
        items = [_state_item(config, state, index, job) for job in jobs]
        feeds[state.input] = np.stack(items) if batching else items[0]
    for control in config.controls:
        values = [_control_value(control, job) for job in jobs]
        array = np.array(values, dtype=_dtype(control.datatype))
        feeds[control.input] = array.reshape(len(jobs), 1) if batching else array.reshape(1)
    return feeds


def keep_states(config: SequenceConfig, info: ModelInfo, jobs: list[Job], outputs: list[Array]) -> None:
    """Each step's new state from the batch's outputs, into ``job.state_out``."""
    names = [t.name for t in info.outputs]
    arrays = [outputs[names.index(state.output)] for state in config.states]
    for i, job in enumerate(jobs):
        parts = [np.ascontiguousarray(a[i] if info.max_batch_size else a).tobytes() for a in arrays]
        job.state_out = b"".join(parts)


def state_write(info: ModelInfo, job: Job) -> StateWrite | None:
    """What the step's reply script does to its sequence: write its new state (an
    answered step), or keep the old one (a failed step); None outside sequences."""
    if info.sequence is None or job.step is None:
        return None
    if job.state_out is not None:
        return StateWrite(WRITE_STATE, job.state_out, info.sequence.idle_timeout_ms)
    return StateWrite(KEEP_STATE, b"", info.sequence.idle_timeout_ms)


def with_hidden_defaults(config: SequenceConfig, inputs: dict[str, Array], batching: bool) -> dict[str, Array]:
    """``inputs`` with the state and control inputs it lacks (a warm-up's or a
    canary's feed): initial states and "false" controls."""
    missing = config.hidden_inputs() - inputs.keys()
    if not missing:
        return inputs
    first = next(iter(inputs.values()), None)
    batch = int(first.shape[0]) if batching and first is not None and first.ndim else 1
    fed = dict(inputs)
    for state in config.states:
        if state.input in missing:
            item = np.full(state.dims, state.initial, dtype=_dtype(state.datatype))
            fed[state.input] = np.stack([item] * batch) if batching else item
    for control in config.controls:
        if control.input in missing:
            value = 0 if control.datatype == "BYTES" else control.values[0]
            array = np.full((batch, 1) if batching else (1,), value, dtype=_dtype(control.datatype))
            fed[control.input] = array
    return fed


def _state_item(config: SequenceConfig, state: SequenceState, index: int, job: Job) -> Array:
    dtype = _dtype(state.datatype)
    assert job.step is not None
    assert job.step.state is not None
    if not job.step.state:  # the initial state
        return np.full(state.dims, state.initial, dtype=dtype)
    offset = 0
    for earlier in config.states[:index]:
        offset += int(np.prod(earlier.dims, dtype=np.int64)) * np.dtype(_dtype(earlier.datatype)).itemsize
    count = int(np.prod(state.dims, dtype=np.int64))
    return np.frombuffer(job.step.state, dtype=dtype, count=count, offset=offset).reshape(state.dims)


def _control_value(control: SequenceControl, job: Job) -> Any:
    assert job.step is not None
    flags = job.step.flags
    if control.kind == "correlation_id":
        sequence_id = member_sequence_id(job.step.member)
        if control.datatype == "BYTES":
            return sequence_id[1:]
        return int(sequence_id[1:]) if sequence_id.startswith("i") else 0
    on = {"start": START in flags, "end": END in flags, "ready": True}[control.kind]
    return control.values[1] if on else control.values[0]


def _dtype(datatype: str) -> Any:
    return object if datatype == "BYTES" else NUMPY_BY_KSERVE[datatype]
