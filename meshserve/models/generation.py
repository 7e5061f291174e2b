"""Decoupled models and the built-in ``generate`` execution mode: their config.yaml
section and their request parameters.

A model with ``decoupled: true`` may answer a request with zero, one or many
responses (ModelStreamInfer only). With a ``generate`` section too, its ONNX graph is
one decoder step (token ids and state tensors in; next-token logits and the new
state out) and the worker runs the loop (``model_workers/generate.py``)::

    decoupled: true
    generate:
      tokens: token_id       # INT64 [batch, 1] input: the token fed at each step
      logits: logits         # float [batch, vocab] output: the next token's logits
      state:                 # each state input -> the output that carries its next value
        state: next_state
      output: token          # the name the generated tokens have for clients (default "token")
      max_tokens: 64         # the default and the ceiling of the max_tokens parameter
      end_id: -1             # the default end id; -1: none

Clients send the prompt as the ``tokens`` input, INT64 ``[n]`` (n >= 1), and get one
response per generated token, ``output`` INT64 ``[1]``. Parsing raises ``ValueError``
with the key at fault; the repository adds the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_KEYS = frozenset({"tokens", "logits", "state", "output", "max_tokens", "end_id"})

DEFAULT_OUTPUT = "token"
DEFAULT_MAX_TOKENS = 64
NO_END_ID = -1

PARAMETERS = ("max_tokens", "end_id", "temperature", "top_k", "seed")
"""The request parameters a generating worker reads; the gateway forwards these only."""


@dataclass(frozen=True, slots=True)
class GenerateConfig:
    """A model's ``generate`` section: how its step graph is driven."""

    tokens: str
    logits: str
    state: tuple[tuple[str, str], ...]  # (state input, the output with its next value)
    output: str = DEFAULT_OUTPUT
    max_tokens: int = DEFAULT_MAX_TOKENS
    end_id: int = NO_END_ID


def parse_generate(raw: object) -> GenerateConfig | None:
    """The ``generate`` section (None when absent)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("'generate' must be a mapping")
    unknown = sorted(str(k) for k in raw if k not in _KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) 'generate.{unknown[0]}'; known: {', '.join(sorted(_KEYS))}")
    names = {}
    for key in ("tokens", "logits"):
        value = raw.get(key)
        if not isinstance(value, str) or not value:
            raise ValueError(f"'generate.{key}' must name a tensor of the graph")
        names[key] = value
    state = raw.get("state") or {}
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in state.items()):
        raise ValueError("'generate.state' must map each state input to the output with its next value")
    output = raw.get("output", DEFAULT_OUTPUT)
    if not isinstance(output, str) or not output:
        raise ValueError("'generate.output' must be a non-empty name")
    max_tokens = raw.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"'generate.max_tokens' must be an integer >= 1, got {max_tokens!r}")
    end_id = raw.get("end_id", NO_END_ID)
    if isinstance(end_id, bool) or not isinstance(end_id, int):
        raise ValueError(f"'generate.end_id' must be an integer (-1: none), got {end_id!r}")
    return GenerateConfig(names["tokens"], names["logits"], tuple(state.items()), output, max_tokens, end_id)


def check_generate(config: GenerateConfig, inputs: Mapping[str, str], outputs: Mapping[str, str]) -> None:
    """That the graph (tensor name -> datatype) has what ``config`` names; ValueError if not."""
    if inputs.get(config.tokens) != "INT64":
        raise ValueError(f"'generate.tokens': the graph has no INT64 input '{config.tokens}'")
    if outputs.get(config.logits) not in ("FP32", "FP16", "FP64"):
        raise ValueError(f"'generate.logits': the graph has no float output '{config.logits}'")
    for state_in, state_out in config.state:
        if state_in not in inputs or state_out not in outputs:
            raise ValueError(f"'generate.state': '{state_in}' -> '{state_out}' is not an input and an output")
    fed = {config.tokens, *(s for s, _ in config.state)}
    if missing := sorted(set(inputs) - fed):
        raise ValueError(f"'generate': graph input '{missing[0]}' is neither the tokens nor a state input")


@dataclass(frozen=True, slots=True)
class GenerateParams:
    """One request's sampling: greedy when ``temperature`` is 0 or ``top_k`` is 1."""

    max_tokens: int
    end_id: int
    temperature: float = 0.0
    top_k: int = 0  # 0: every token
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


def generate_params(config: GenerateConfig, given: Mapping[str, str]) -> GenerateParams:
    """The request's parameters (text, as the envelope carries them) over the model's
    defaults; ValueError naming the parameter when one is out of range."""
    max_tokens = _number(given, "max_tokens", int, config.max_tokens)
    if not 0 <= max_tokens <= config.max_tokens:
        raise ValueError(f"parameter 'max_tokens' must be within 0..{config.max_tokens}, got {max_tokens}")
    temperature = _number(given, "temperature", float, 0.0)
    if not 0.0 <= temperature <= 100.0:
        raise ValueError(f"parameter 'temperature' must be within 0..100, got {temperature}")
    top_k = _number(given, "top_k", int, 0)
    if top_k < 0:
        raise ValueError(f"parameter 'top_k' must be >= 0, got {top_k}")
    seed = _number(given, "seed", int, -1)
    return GenerateParams(
        max_tokens, _number(given, "end_id", int, config.end_id), temperature, top_k, None if seed < 0 else seed
    )


def _number(given: Mapping[str, str], name: str, kind: type[Any], default: Any) -> Any:
    text = given.get(name)
    if text is None or text == "":
        return default
    try:
        return kind(float(text)) if kind is int and "." in text else kind(text)
    except ValueError:
        raise ValueError(f"parameter '{name}' must be a number, got {text!r}") from None
