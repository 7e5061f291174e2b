"""A stateful model's ``sequence:`` section of config.yaml (Triton's sequence batching).

::

    sequence:
      idle_timeout_s: 60            # a sequence idle this long is freed (default 60)
      max_sequences: 10000          # live sequences of this model version (0: unbounded)
      max_sequences_per_tenant: 0   # live sequences of one tenant (0: unbounded)
      controls:                     # graph inputs the worker fills, never the client
        - {kind: start, input: START, values: [0, 1]}   # [false, true], the input's dtype
        - {kind: end, input: END}
        - {kind: ready, input: READY}
        - {kind: correlation_id, input: CORRID}
      states:                       # implicit state: an input fed from an output of the step before
        - {input: state_in, output: state_out, initial: 0}

Control and state inputs are hidden from clients (metadata, ModelConfig's inputs):
the worker feeds them. A state's dims (batch dim excluded) must be fixed, so each
sequence's state is a fixed number of bytes. Unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONTROL_KINDS = ("start", "end", "ready", "correlation_id")
"""Triton's CONTROL_SEQUENCE_START, _END, _READY and _CORRID."""

DEFAULT_IDLE_TIMEOUT_S = 60.0

_KEYS = frozenset({"idle_timeout_s", "max_sequences", "max_sequences_per_tenant", "controls", "states"})
_CONTROL_KEYS = frozenset({"kind", "input", "values"})
_STATE_KEYS = frozenset({"input", "output", "initial"})


@dataclass(frozen=True, slots=True)
class SequenceControl:
    """A control input: ``values`` is (false, true), sent in the input's datatype."""

    kind: str
    input: str
    datatype: str = ""  # the graph's, filled in by :func:`bind_sequence`
    values: tuple[float, float] = (0, 1)


@dataclass(frozen=True, slots=True)
class SequenceState:
    """An implicit state pair: ``input`` gets what ``output`` gave the step before;
    a sequence's first step gets ``initial`` in every element."""

    input: str
    output: str
    datatype: str = ""  # the graph's, filled in by :func:`bind_sequence`
    dims: tuple[int, ...] = ()  # one item's, batch dim excluded; fixed
    initial: float = 0


@dataclass(frozen=True, slots=True)
class SequenceConfig:
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_sequences: int = 0
    max_sequences_per_tenant: int = 0
    controls: tuple[SequenceControl, ...] = ()
    states: tuple[SequenceState, ...] = ()

    @property
    def idle_timeout_ms(self) -> int:
        return max(1, round(self.idle_timeout_s * 1000))

    def hidden_inputs(self) -> frozenset[str]:
        """The graph inputs the worker feeds (controls and states)."""
        return frozenset(c.input for c in self.controls) | frozenset(s.input for s in self.states)


def parse_sequence(raw: object) -> SequenceConfig | None:
    """The section, checked on its own; None when absent. Raises ValueError naming the key."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("'sequence' must be a mapping")
    _reject(raw, _KEYS, "sequence")
    idle = raw.get("idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S)
    if isinstance(idle, bool) or not isinstance(idle, int | float) or idle <= 0:
        raise ValueError(f"'sequence.idle_timeout_s' must be a positive number, got {idle!r}")
    controls = tuple(_control(i, c) for i, c in enumerate(_list(raw.get("controls"), "sequence.controls")))
    states = tuple(_state(i, s) for i, s in enumerate(_list(raw.get("states"), "sequence.states")))
    kinds = [c.kind for c in controls]
    if len(set(kinds)) < len(kinds):
        raise ValueError(f"'sequence.controls': each kind at most once, got {kinds}")
    return SequenceConfig(
        idle_timeout_s=float(idle),
        max_sequences=_count(raw, "max_sequences"),
        max_sequences_per_tenant=_count(raw, "max_sequences_per_tenant"),
        controls=controls,
        states=states,
    )


def bind_sequence(
    config: SequenceConfig,
    inputs: dict[str, tuple[str, tuple[int, ...]]],
    outputs: dict[str, tuple[str, tuple[int, ...]]],
    batch_dims: int,
) -> SequenceConfig:
    """``config`` with the graph's datatypes and dims; ``inputs``/``outputs`` map a
    graph tensor's name to (datatype, full shape). Raises ValueError naming the key."""
    controls = []
    for c in config.controls:
        if c.input not in inputs:
            raise ValueError(f"'sequence.controls' {c.kind}: the graph has no input {c.input!r}")
        controls.append(SequenceControl(c.kind, c.input, inputs[c.input][0], c.values))
    states = []
    for s in config.states:
        if s.input not in inputs:
            raise ValueError(f"'sequence.states': the graph has no input {s.input!r}")
        if s.output not in outputs:
            raise ValueError(f"'sequence.states': the graph has no output {s.output!r}")
        datatype, shape = inputs[s.input]
        dims = shape[batch_dims:]
        if any(d < 0 for d in dims) or datatype == "BYTES":
            raise ValueError(
                f"'sequence.states' {s.input}: a state needs fixed dims and a numeric type, the graph has "
                f"{datatype} {list(dims)}"
            )
        if outputs[s.output][0] != datatype:
            raise ValueError(
                f"'sequence.states' {s.input}: output {s.output!r} is {outputs[s.output][0]}, not {datatype}"
            )
        states.append(SequenceState(s.input, s.output, datatype, dims, s.initial))
    return SequenceConfig(
        config.idle_timeout_s, config.max_sequences, config.max_sequences_per_tenant, tuple(controls), tuple(states)
    )


def _control(index: int, raw: object) -> SequenceControl:
    where = f"sequence.controls[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"'{where}' must be a mapping")
    _reject(raw, _CONTROL_KEYS, where)
    kind, name = raw.get("kind"), raw.get("input")
    if kind not in CONTROL_KINDS:
        raise ValueError(f"'{where}.kind' must be one of {', '.join(CONTROL_KINDS)}, got {kind!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"'{where}.input' must name a graph input")
    values = raw.get("values", [0, 1])
    if not (isinstance(values, list) and len(values) == 2 and all(_number(v) for v in values)):
        raise ValueError(f"'{where}.values' must be [false, true] numbers, got {values!r}")
    return SequenceControl(kind, name, "", (float(values[0]), float(values[1])))


def _state(index: int, raw: object) -> SequenceState:
    where = f"sequence.states[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"'{where}' must be a mapping")
    _reject(raw, _STATE_KEYS, where)
    name, output, initial = raw.get("input"), raw.get("output"), raw.get("initial", 0)
    if not isinstance(name, str) or not isinstance(output, str) or not name or not output:
        raise ValueError(f"'{where}' needs 'input' and 'output' tensor names")
    if not _number(initial):
        raise ValueError(f"'{where}.initial' must be a number, got {initial!r}")
    return SequenceState(name, output, "", (), float(initial))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(raw: dict[Any, Any], key: str) -> int:
    value = raw.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"'sequence.{key}' must be a whole number >= 0 (0: unbounded), got {value!r}")
    return value


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"'{where}' must be a list")
    return value


def _reject(raw: dict[Any, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise ValueError(f"'{where}': unknown keys {unknown} (allowed: {sorted(allowed)})")
