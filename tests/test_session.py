"""A worker's ONNX Runtime session: how it is configured, warmed up and run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from meshserve.models.repository import load_model
from model_workers.engines import BOUNDED_SPIN_US, SPIN_BOUNDED, SPIN_OFF, SPIN_ON, EngineSetting
from model_workers.session import LoadedModel


def _options(model: LoadedModel) -> ort.SessionOptions:
    session = model.session
    assert isinstance(session, ort.InferenceSession)
    return session.get_session_options()


@pytest.mark.parametrize(("spin", "entry"), [(SPIN_OFF, "0"), (SPIN_ON, "1"), (SPIN_BOUNDED, "1")])
def test_idle_threads_spin_only_when_asked(model_repository: Path, spin: str, entry: str) -> None:
    model = LoadedModel(load_model(model_repository / "cnn", 1), engine=EngineSetting(2, spin))
    options = _options(model)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == entry
    if spin == SPIN_BOUNDED:
        assert options.get_session_config_entry("session.intra_op.spin_duration_us") == str(BOUNDED_SPIN_US)
    else:
        with pytest.raises(RuntimeError, match="does not have configuration"):
            options.get_session_config_entry("session.intra_op.spin_duration_us")


def test_intra_op_threads_are_passed_to_onnx_runtime(model_repository: Path) -> None:
    model = LoadedModel(load_model(model_repository / "cnn", 1), engine=EngineSetting(intra_op_threads=1))
    assert _options(model).intra_op_num_threads == 1


def test_use_engine_rebuilds_the_session_under_the_new_setting(model_repository: Path) -> None:
    model = LoadedModel(load_model(model_repository / "cnn", 1))
    model.use_engine(EngineSetting(1, SPIN_OFF))
    assert (_options(model).intra_op_num_threads, model.engine) == (1, EngineSetting(1, SPIN_OFF))


def test_warm_up_marks_ready_and_runs_every_output(model_repository: Path) -> None:
    model = LoadedModel(load_model(model_repository / "mlp", 1))
    assert not model.ready
    model.warm_up()
    assert model.ready
    outputs = model.run(model.sample_inputs(3))
    assert [out.shape[0] for out in outputs] == [3] * len(model.info.outputs)
    assert all(np.isfinite(out).all() for out in outputs if out.dtype.kind == "f")
