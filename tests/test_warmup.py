"""Warm-up: the config's inputs when given, guessed sizes for symbolic dims otherwise,
and never a failed guess in the way of readiness."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from meshserve.models.repository import RepositoryError, load_model
from model_workers.session import LoadedModel
from model_workers.warmup import GUESSED_SIZES
from tests.warmup_models import write_fixed_area_model, write_stride32_model


def _config(repository: Path, model: str, text: str) -> None:
    (repository / model / "config.yaml").write_text(text)


def test_a_stride_32_detector_warms_up_at_a_guessed_size(tmp_path: Path) -> None:
    write_stride32_model(tmp_path)
    model = LoadedModel(load_model(tmp_path / "detector", 1), intra_op_threads=1)
    model.warm_up()
    assert model.ready
    assert model.warmed
    feed = model.sample_inputs(1)
    assert feed["image"].shape == (1, 3, 224, 224)  # the first guess that is a multiple of 32
    model.canary()


def test_a_model_no_guess_fits_is_ready_without_warm_up_and_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_fixed_area_model(tmp_path)
    model = LoadedModel(load_model(tmp_path / "area", 1), intra_op_threads=1)
    with caplog.at_level(logging.INFO, logger="model_workers.session"):
        model.warm_up()
    assert model.ready
    assert not model.warmed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert ", ".join(str(size) for size in GUESSED_SIZES) in warnings[0]
    assert "config.yaml" in warnings[0]
    assert "'warmup:'" in warnings[0]
    model.canary()  # nothing to run: it does not fail the model
    # and the model serves what fits it
    (out,) = model.run({"image": np.ones((2, 3, 25, 40), dtype=np.float32)})
    assert out.shape == (2, 3, 1000)


def test_the_config_warm_up_inputs_are_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_fixed_area_model(tmp_path)
    _config(
        tmp_path, "area", "warmup:\n  - name: letterbox\n    inputs:\n      image: {dims: [3, 25, 40], data: zeros}\n"
    )
    model = LoadedModel(load_model(tmp_path / "area", 1), intra_op_threads=1)
    with caplog.at_level(logging.WARNING):
        model.warm_up()
    assert model.warmed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    feed = model.sample_inputs(4)
    assert feed["image"].shape == (4, 3, 25, 40)
    assert not feed["image"].any()


def test_a_config_warm_up_file_holds_one_item(tmp_path: Path) -> None:
    write_fixed_area_model(tmp_path)
    item = np.arange(3 * 25 * 40, dtype=np.float32).reshape(3, 25, 40)
    (tmp_path / "area" / "warmup").mkdir()
    (tmp_path / "area" / "warmup" / "image.bin").write_bytes(item.tobytes())
    _config(
        tmp_path, "area", "warmup:\n  - batch_size: 3\n    inputs:\n      image: {dims: [3, 25, 40], file: image.bin}\n"
    )
    model = LoadedModel(load_model(tmp_path / "area", 1), intra_op_threads=1)
    model.warm_up()
    np.testing.assert_array_equal(model.sample_inputs(3)["image"], np.stack([item] * 3))


def test_config_warm_up_inputs_that_do_not_run_fail_the_load(tmp_path: Path) -> None:
    write_fixed_area_model(tmp_path)
    _config(tmp_path, "area", "warmup:\n  - inputs:\n      image: {dims: [3, 32, 32]}\n")
    model = LoadedModel(load_model(tmp_path / "area", 1), intra_op_threads=1)
    with pytest.raises(Exception, match=r"(?i)reshape"):
        model.warm_up()  # the operator's own sizes: a real failure, reported
    assert not model.ready


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("warmup: {image: 1}", "'warmup' must be a non-empty list"),
        ("warmup:\n  - inputs: {image: {dims: [3, 8, 8]}}\n    shapes: 1", "unknown key 'warmup\\[0\\].shapes'"),
        ("warmup:\n  - inputs: {image: {dims: [3, 8, 8], data: ones}}", "'warmup\\[0\\].inputs.image.data' must be"),
        ("warmup:\n  - inputs: {image: {dims: [4, 8, 8]}}", "dims' \\[4, 8, 8\\] do not fit the graph's \\[3, '\\?'"),
        ("warmup:\n  - inputs: {other: {dims: [3, 8, 8]}}", "missing \\['image'\\], unknown \\['other'\\]"),
        ("warmup:\n  - inputs: {image: {dims: [3, 8, 8], file: x.bin}}", "no file"),
        ("warmup:\n  - inputs: {image: {dims: [3, 8, 8], file: ../config.yaml}}", "points outside"),
        ("warmup:\n  - batch_size: 64\n    inputs: {image: {dims: [3, 8, 8]}}", "exceeds max_batch_size 32"),
    ],
)
def test_a_bad_warm_up_section_is_refused_naming_the_key(tmp_path: Path, section: str, message: str) -> None:
    write_fixed_area_model(tmp_path)
    _config(tmp_path, "area", section + "\n")
    with pytest.raises(RepositoryError, match=message):
        load_model(tmp_path / "area", 1)
