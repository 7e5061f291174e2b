"""Ensembles: a config.yaml ``ensemble:`` section that chains models, as Triton's
ensemble scheduling does, and its validation against the models it names.

    ensemble:
      steps:
        - model: preprocess          # the latest version, or `version: N`
          input_map: {raw: IMAGE}    # the step's input <- an ensemble tensor
          output_map: {out: PIXELS}  # the step's output -> an ensemble tensor
        - model: classifier
          input_map: {image: PIXELS}
          output_map: {logits: LOGITS}
      outputs: [LOGITS]              # what the client gets back

Steps run in the order listed; a step may read only the ensemble's inputs and the
tensors of steps before it. The ensemble's inputs are the tensors read before any
step writes them (their datatype and shape are the reading step's); its outputs are
those listed, as their step writes them. :func:`parse_ensemble` checks the section's
form (a :class:`~meshserve.models.repository.RepositoryError` naming the path);
:func:`validate_ensemble` checks it against the models (an :class:`EnsembleError`
naming the step, model and tensor: unknown model, version or tensor, a step input
left unmapped, a tensor written twice, a datatype or shape that does not match).

A model directory whose config.yaml has an ``ensemble`` section is an ensemble
(:func:`read_ensemble_dir`; the repository scan leaves it to this module): no
model.onnx, only ``ensemble``, ``platform: ensemble`` (optional) and ``versions``
keys; its versions are its version directories (empty ones, Triton's layout) or,
with none, version 1. The router checks every ensemble against the models it serves
whenever they change (:func:`check_ensembles`): one that fails is UNAVAILABLE with
the reason, the others are in the routing table (:func:`ensemble_info`) and READY
while every step's model version is. A step may not name another ensemble.
The gateway's runner is :mod:`gateway.ensemble`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meshserve.models.repository import ANY_DIM, CONFIG_FILENAME, ModelInfo, RepositoryError, TensorInfo

ENSEMBLE_PLATFORM = "ensemble"
_KEYS = frozenset({"ensemble", "platform", "versions"})
_VERSION_DIR = re.compile(r"[1-9][0-9]*")


class EnsembleError(Exception):
    """An ensemble that cannot run with the models there are; the message says why
    (the ensemble is UNAVAILABLE with it as the reason)."""


@dataclass(frozen=True, slots=True)
class EnsembleStep:
    model: str
    version: int  # 0: the latest
    input_map: tuple[tuple[str, str], ...]  # (the step model's input, the ensemble tensor it reads)
    output_map: tuple[tuple[str, str], ...]  # (the step model's output, the ensemble tensor it writes)


@dataclass(frozen=True, slots=True)
class EnsembleConfig:
    steps: tuple[EnsembleStep, ...]
    outputs: tuple[str, ...]  # ensemble tensors answered to the client


@dataclass(frozen=True, slots=True)
class Ensemble:
    """A validated ensemble: its steps, each with the model version it runs, and its
    outer inputs and outputs (what ModelMetadata shows)."""

    name: str
    version: int
    steps: tuple[EnsembleStep, ...]  # versions resolved: none is 0
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


def parse_ensemble(raw: object, path: Path) -> EnsembleConfig:
    """The ``ensemble`` section of the config.yaml at ``path``."""
    if not isinstance(raw, dict) or set(raw) - {"steps", "outputs"}:
        raise RepositoryError(f"{path}: 'ensemble' must be a mapping with 'steps' and 'outputs'")
    steps_raw, outputs = raw.get("steps"), raw.get("outputs")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise RepositoryError(f"{path}: 'ensemble.steps' must be a non-empty list")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) and o for o in outputs):
        raise RepositoryError(f"{path}: 'ensemble.outputs' must be a non-empty list of tensor names")
    steps = tuple(_step(step, path, f"ensemble.steps[{index}]") for index, step in enumerate(steps_raw))
    return EnsembleConfig(steps, tuple(outputs))


def _step(raw: Any, path: Path, where: str) -> EnsembleStep:
    if not isinstance(raw, dict) or set(raw) - {"model", "version", "input_map", "output_map"}:
        raise RepositoryError(f"{path}: '{where}' must be a mapping of model, version, input_map, output_map")
    model, version = raw.get("model"), raw.get("version", 0)
    if not isinstance(model, str) or not model:
        raise RepositoryError(f"{path}: '{where}.model' must name a model")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise RepositoryError(f"{path}: '{where}.version' must be a positive integer (or absent: the latest)")
    return EnsembleStep(
        model,
        version,
        _mapping(raw.get("input_map"), path, f"{where}.input_map"),
        _mapping(raw.get("output_map"), path, f"{where}.output_map"),
    )


def _mapping(raw: Any, path: Path, where: str) -> tuple[tuple[str, str], ...]:
    if (
        not isinstance(raw, dict)
        or not raw
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items())
    ):
        raise RepositoryError(f"{path}: '{where}' must map tensor names to tensor names")
    return tuple(raw.items())


ModelLookup = Callable[[str, int], ModelInfo | None]
"""The model version a step names (version 0: the latest); None when there is none."""


def validate_ensemble(name: str, version: int, config: EnsembleConfig, models: ModelLookup) -> Ensemble:
    """The ensemble checked against ``models``; raises EnsembleError with the first reason."""
    written: dict[str, TensorInfo] = {}  # ensemble tensor -> what writes it
    inputs: dict[str, TensorInfo] = {}  # read before any step writes it
    steps = []
    for number, step in enumerate(config.steps, start=1):
        model = models(step.model, step.version)
        at = f"ensemble '{name}' step {number} (model '{step.model}')"
        if model is None:
            which = f"version {step.version} of model" if step.version else "model"
            raise EnsembleError(f"{at}: unknown {which} '{step.model}'")
        _read(at, model, step, written, inputs)
        _write(at, model, step, written, inputs)
        steps.append(EnsembleStep(model.name, model.version, step.input_map, step.output_map))
    outputs = []
    for output in config.outputs:
        if output not in written:
            raise EnsembleError(f"ensemble '{name}': output '{output}' is written by no step")
        outputs.append(written[output])
    return Ensemble(name, version, tuple(steps), tuple(inputs.values()), tuple(outputs))


def _read(
    at: str, model: ModelInfo, step: EnsembleStep, written: dict[str, TensorInfo], inputs: dict[str, TensorInfo]
) -> None:
    """Check a step's inputs; a tensor nothing wrote yet becomes an ensemble input."""
    model_inputs = {t.name: t for t in model.inputs}
    mapped = dict(step.input_map)
    for tensor in model.inputs:
        if tensor.name not in mapped:
            raise EnsembleError(f"{at}: input '{tensor.name}' is not in its input_map")
    for step_input, source in step.input_map:
        if step_input not in model_inputs:
            raise EnsembleError(f"{at}: '{step_input}' is not an input of the model")
        wanted = model_inputs[step_input]
        have = written.get(source) or inputs.get(source)
        if have is None:
            inputs[source] = TensorInfo(source, wanted.datatype, wanted.shape)
        else:
            _check_fits(at, source, have, wanted)


def _write(
    at: str, model: ModelInfo, step: EnsembleStep, written: dict[str, TensorInfo], inputs: dict[str, TensorInfo]
) -> None:
    """Record a step's outputs; each ensemble tensor is written once."""
    model_outputs = {t.name: t for t in model.outputs}
    for step_output, target in step.output_map:
        if step_output not in model_outputs:
            raise EnsembleError(f"{at}: '{step_output}' is not an output of the model")
        if target in written or target in inputs:
            raise EnsembleError(f"{at}: tensor '{target}' is written twice (or is an input of the ensemble)")
        produced = model_outputs[step_output]
        written[target] = TensorInfo(target, produced.datatype, produced.shape)


def _check_fits(at: str, tensor: str, have: TensorInfo, wanted: TensorInfo) -> None:
    """A tensor written (or read) before, as this step's input expects it."""
    if have.datatype != wanted.datatype:
        raise EnsembleError(f"{at}: tensor '{tensor}' is {have.datatype}, the model's input wants {wanted.datatype}")
    fits = len(have.shape) == len(wanted.shape) and all(
        a == b or ANY_DIM in (a, b) for a, b in zip(have.shape, wanted.shape, strict=True)
    )
    if not fits:
        raise EnsembleError(
            f"{at}: tensor '{tensor}' has shape {list(have.shape)}, the model's input wants {list(wanted.shape)}"
        )


# --- the repository: ensemble directories, checked against the models --------


@dataclass(frozen=True, slots=True)
class EnsembleDir:
    """An ensemble's directory as read, not yet checked against the models it names;
    ``problem``: why its config.yaml cannot be used (then ``config`` is None)."""

    name: str
    versions: tuple[int, ...]
    path: Path  # its config.yaml
    config: EnsembleConfig | None
    problem: str = ""


def read_ensemble_dir(model_dir: Path) -> EnsembleDir | None:
    """The ensemble in ``model_dir``; None when its config.yaml (absent, unreadable or
    not YAML: the model scan reports those) has no ``ensemble`` section."""
    path = model_dir / CONFIG_FILENAME
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict) or "ensemble" not in raw:
        return None
    dirs = sorted(int(c.name) for c in model_dir.iterdir() if _VERSION_DIR.fullmatch(c.name) and c.is_dir())
    versions = tuple(dirs) or (1,)
    try:
        unknown = sorted(str(key) for key in raw if key not in _KEYS)
        if unknown:
            raise RepositoryError(
                f"{path}: unknown key '{unknown[0]}' in an ensemble (allowed: {', '.join(sorted(_KEYS))})"
            )
        if raw.get("platform", ENSEMBLE_PLATFORM) != ENSEMBLE_PLATFORM:
            raise RepositoryError(f"{path}: an ensemble's 'platform' is '{ENSEMBLE_PLATFORM}', got {raw['platform']!r}")
        listed = raw.get("versions")
        if listed is not None:
            if not isinstance(listed, list) or not all(type(v) is int and v > 0 for v in listed):
                raise RepositoryError(f"{path}: 'versions' must be a list of positive integers, got {listed!r}")
            versions = tuple(sorted(set(listed)))
        return EnsembleDir(model_dir.name, versions, path.absolute(), parse_ensemble(raw["ensemble"], path))
    except RepositoryError as exc:
        return EnsembleDir(model_dir.name, versions, path.absolute(), None, str(exc))


def check_ensembles(
    dirs: Iterable[EnsembleDir], models: Mapping[tuple[str, int], ModelInfo]
) -> tuple[dict[tuple[str, int], Ensemble], dict[tuple[str, int], str]]:
    """Every version of every ensemble checked against ``models`` (the servable model
    versions, ensembles not among them): those that can run, and why the others cannot."""
    latest: dict[str, int] = {}
    for name, version in models:
        latest[name] = max(version, latest.get(name, 0))

    def lookup(name: str, version: int) -> ModelInfo | None:
        return models.get((name, version or latest.get(name, 0)))

    valid: dict[tuple[str, int], Ensemble] = {}
    failed: dict[tuple[str, int], str] = {}
    for found in dirs:
        for version in found.versions:
            key = (found.name, version)
            if found.config is None:
                failed[key] = found.problem
                continue
            try:
                valid[key] = validate_ensemble(found.name, version, found.config, lookup)
            except EnsembleError as exc:
                failed[key] = str(exc)
    return valid, failed


def ensemble_info(name: str, version: int, path: Path, ensemble: Ensemble | None = None) -> ModelInfo:
    """An ensemble version as the routing table lists it: its outer tensors (none
    when it cannot run), platform "ensemble", never batched or placed."""
    return ModelInfo(
        name=name,
        version=version,
        path=path,
        inputs=ensemble.inputs if ensemble else (),
        outputs=ensemble.outputs if ensemble else (),
        max_batch_size=0,
        max_queue_delay_us=0,
        preferred_batch_sizes=(),
        max_queue_size=0,
        platform=ENSEMBLE_PLATFORM,
    )
