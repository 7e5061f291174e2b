"""Engine settings chosen by measurement at warm-up: which settings are tried, which
is kept, what config.yaml and the worker's flags fix, and what the log and metric say."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import generate_latest

from meshserve.devkit.examples import write_example_repository
from meshserve.models.execution import EngineConfig
from meshserve.models.repository import RepositoryError, load_model
from model_workers.engines import SPIN_BOUNDED, SPIN_OFF, SPIN_ON, EngineSetting, Trial, bounded_spin_supported
from model_workers.session import LoadedModel
from model_workers.tuning import candidates, choose_engine, fixed_setting, pick
from tests.support import infer_request, infer_stub, start_mesh, stop_mesh
from tests.test_metrics import parse

ONE = EngineSetting(1, SPIN_OFF)
ALL_SLEEP = EngineSetting(4, SPIN_OFF)
ALL_SPIN = EngineSetting(4, SPIN_BOUNDED)


def _threads(model: LoadedModel) -> int:
    session = model.session
    assert isinstance(session, ort.InferenceSession)
    return int(session.get_session_options().intra_op_num_threads)


def test_candidates_are_one_thread_or_the_budget_sleeping_or_spinning_cheapest_first() -> None:
    assert candidates(None, None, budget=4, bounded=True) == [ONE, ALL_SLEEP, ALL_SPIN]
    assert candidates(None, None, budget=4, bounded=False) == [ONE, ALL_SLEEP, EngineSetting(4, SPIN_ON)]
    assert candidates(None, None, budget=1, bounded=True) == [ONE]  # one thread has no pool to spin
    auto = [ONE, EngineSetting(0, SPIN_OFF), EngineSetting(0, SPIN_BOUNDED)]
    assert candidates(None, None, budget=0, bounded=True) == auto  # 0: ONNX Runtime's choice


def test_what_is_fixed_is_not_tried() -> None:
    assert candidates(2, None, budget=4, bounded=True) == [EngineSetting(2, SPIN_OFF), EngineSetting(2, SPIN_BOUNDED)]
    assert candidates(None, SPIN_ON, budget=4, bounded=True) == [EngineSetting(1, SPIN_ON), EngineSetting(4, SPIN_ON)]
    assert candidates(3, SPIN_OFF, budget=4, bounded=True) == [EngineSetting(3, SPIN_OFF)]


def test_flags_override_config_yaml_and_fix_what_they_give() -> None:
    config = EngineConfig(intra_op_threads=2, spin=SPIN_BOUNDED)
    assert fixed_setting(0, None, config) == (2, SPIN_BOUNDED)
    assert fixed_setting(1, None, config) == (1, SPIN_BOUNDED)
    assert fixed_setting(0, False, config) == (2, SPIN_OFF)
    assert fixed_setting(0, True, EngineConfig()) == (None, SPIN_ON)
    assert fixed_setting(0, None, EngineConfig()) == (None, None)


def test_pick_keeps_the_fastest_at_batch_one_and_max_batch_together() -> None:
    # The MobileNet case of issue 16: sleeping pool threads double batch 1.
    trials = [Trial(ONE, 0.0016, 0.030), Trial(ALL_SLEEP, 0.0024, 0.016), Trial(ALL_SPIN, 0.0011, 0.016)]
    assert pick(trials).setting == ALL_SPIN
    # A model of a few big ops: threads help both, spinning nothing.
    trials = [Trial(ONE, 0.0030, 0.024), Trial(ALL_SLEEP, 0.0016, 0.012), Trial(ALL_SPIN, 0.0016, 0.012)]
    assert pick(trials).setting == ALL_SLEEP
    # Not batchable: batch 1 alone decides.
    assert pick([Trial(ONE, 0.002, None), Trial(ALL_SLEEP, 0.001, None)]).setting == ALL_SLEEP


def test_a_costlier_setting_must_win_by_more_than_the_margin() -> None:
    trials = [Trial(ONE, 0.00102, 0.010), Trial(ALL_SPIN, 0.00100, 0.010)]
    assert pick(trials, margin=0.05).setting == ONE
    assert pick(trials, margin=0.0).setting == ALL_SPIN


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_example_repository(tmp_path_factory.mktemp("models"), ["mlp", "mobilenet"])


def test_the_chosen_setting_is_the_one_whose_injected_timings_are_fastest(repository: Path) -> None:
    model = LoadedModel(load_model(repository / "mlp", 1))
    model.warm_up()
    timings = {ONE: 0.004, EngineSetting(2, SPIN_OFF): 0.003, EngineSetting(2, SPIN_BOUNDED): 0.001}
    tried: list[EngineSetting] = []

    def measure(loaded: LoadedModel, setting: EngineSetting) -> Trial:
        loaded.use_engine(setting)  # as the real measurement does: the session is rebuilt
        tried.append(setting)
        return Trial(setting, timings[setting], timings[setting] * 8)

    choose_engine(model, None, None, budget=2, bounded=True, measure=measure)

    assert tried == list(timings)
    assert (model.engine, model.engine_source) == (EngineSetting(2, SPIN_BOUNDED), "measured")
    assert _threads(model) == 2
    assert [t.setting for t in model.engine_trials] == tried
    features = np.ones((1, 64), np.float32)
    assert np.isfinite(model.run({"features": features})[0]).all()


def test_a_setting_fixed_by_config_yaml_skips_the_trials(repository: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "mlp"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes((repository / "mlp" / "1" / "model.onnx").read_bytes())
    (model_dir / "config.yaml").write_text("engine:\n  intra_op_threads: 1\n  spinning: bounded\n")
    info = load_model(model_dir, 1)
    assert info.engine == EngineConfig(intra_op_threads=1, spin=SPIN_BOUNDED)

    def measure(loaded: LoadedModel, setting: EngineSetting) -> Trial:
        raise AssertionError(f"tried {setting} although config.yaml fixes it")

    model = LoadedModel(info)
    threads, spin = fixed_setting(0, None, info.engine)
    choose_engine(model, threads, spin, budget=4, bounded=True, measure=measure)
    assert (model.engine, model.engine_source) == (EngineSetting(1, SPIN_BOUNDED), "config.yaml")
    assert _threads(model) == 1


@pytest.mark.parametrize(
    ("section", "key"),
    [("engine:\n  spinning: sometimes\n", "engine.spinning"), ("engine:\n  threads: 2\n", "engine.threads")],
)
def test_a_bad_engine_section_is_refused_naming_the_key(
    repository: Path, tmp_path: Path, section: str, key: str
) -> None:
    model_dir = tmp_path / "mlp"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes((repository / "mlp" / "1" / "model.onnx").read_bytes())
    (model_dir / "config.yaml").write_text(section)
    with pytest.raises(RepositoryError, match=key):
        load_model(model_dir, 1)


def test_failing_trials_keep_the_warm_up_setting(repository: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = LoadedModel(load_model(repository / "mlp", 1), engine=EngineSetting(0, SPIN_OFF))

    def measure(loaded: LoadedModel, setting: EngineSetting) -> Trial:
        loaded.use_engine(setting)
        raise RuntimeError("out of memory")

    choose_engine(model, None, None, budget=2, bounded=True, measure=measure)
    assert (model.engine, model.engine_source) == (EngineSetting(0, SPIN_OFF), "default")
    assert "engine trials failed (RuntimeError: out of memory)" in caplog.text


def test_bounded_spinning_is_used_from_the_onnx_runtime_that_honours_it() -> None:
    assert bounded_spin_supported("1.32.0")
    assert bounded_spin_supported("2.0.0")
    assert not bounded_spin_supported("1.17.3")
    assert not bounded_spin_supported("nightly")


@pytest.mark.timeout(60)
async def test_a_worker_measures_each_model_and_reports_the_choice_in_its_log_and_metric(
    redis_url: str, repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="model_workers.tuning")
    mesh = await start_mesh(redis_url, repository, worker_overrides={"intra_op_threads": 0})
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            reply = await infer_stub(channel).ModelInfer(
                infer_request("mobilenet", {"image": np.ones((1, 3, 96, 96), np.float32)}), timeout=10
            )
        assert reply.outputs[0].shape == [1, 100]
        samples = parse(generate_latest(mesh.workers[0].worker.metrics.registry).decode())
    finally:
        await stop_mesh(mesh)

    for name in ("mlp", "mobilenet"):
        lines = [r.message for r in caplog.records if r.message.startswith(f"{name} version 1: engine ")]
        assert len(lines) == 1, lines
        chosen = {
            dict(labels)["setting"]: dict(labels)["source"]
            for (metric, labels), value in samples.items()
            if metric == "meshserve_engine_setting" and dict(labels)["model"] == name and value == 1
        }
        assert len(chosen) == 1, chosen
        setting, source = next(iter(chosen.items()))
        assert lines[0].startswith(f"{name} version 1: engine {setting}")
        if source == "measured":  # a host of one CPU has nothing to try
            tried = {
                dict(labels)["setting"]
                for (metric, labels) in samples
                if metric == "meshserve_engine_trial_seconds" and dict(labels)["model"] == name
            }
            assert setting in tried
            assert len(tried) >= 2
            assert all(s in lines[0] for s in tried)
