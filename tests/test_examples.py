"""The example models: valid ONNX, deterministic bytes, and numerically right in ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from meshserve.devkit.examples import (
    EXAMPLE_MODELS,
    GENERATOR_HIDDEN,
    GENERATOR_VOCAB,
    OPTIONAL_EXAMPLES,
    build_any_size,
    build_cnn,
    build_fixed_adder,
    build_generator,
    build_mlp,
    build_mobilenet,
    default_repository_dir,
    write_example_repository,
)

FloatArray = npt.NDArray[np.float32]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session over an in-memory model."""
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _weights(model: onnx.ModelProto) -> dict[str, FloatArray]:
    """The model's initializers by name, as numpy arrays."""
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


@pytest.mark.parametrize("name", sorted(EXAMPLE_MODELS))
def test_every_example_is_valid_onnx(name: str) -> None:
    model = EXAMPLE_MODELS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.name == name
    assert model.opset_import[0].version == 17


@pytest.mark.parametrize("name", sorted(EXAMPLE_MODELS))
def test_building_twice_gives_identical_bytes(name: str) -> None:
    first = EXAMPLE_MODELS[name]().SerializeToString(deterministic=True)
    second = EXAMPLE_MODELS[name]().SerializeToString(deterministic=True)
    assert first == second


def test_mlp_matches_numpy() -> None:
    model = build_mlp()
    w = _weights(model)
    features = np.random.default_rng(7).standard_normal((5, 64)).astype(np.float32)

    logits, probabilities = _session(model).run(["logits", "probabilities"], {"features": features})

    hidden = np.maximum(features @ w["w1"] + w["b1"], 0.0)
    expected_logits = hidden @ w["w2"] + w["b2"]
    shifted = np.exp(expected_logits - expected_logits.max(axis=1, keepdims=True))
    expected_probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    assert logits.shape == (5, 10)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(probabilities, expected_probabilities, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_fixed_adder_adds_and_subtracts() -> None:
    a = np.array([[1, -2, 3, 2**40]], dtype=np.int64)
    b = np.array([[10, 20, -30, 5]], dtype=np.int64)

    total, diff = _session(build_fixed_adder()).run(["sum", "diff"], {"a": a, "b": b})

    np.testing.assert_array_equal(total, a + b)
    np.testing.assert_array_equal(diff, a - b)
    assert total.dtype == np.int64


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 1, 7, 5), (2, 1, 64, 33)])
def test_scale_any_takes_any_size(shape: tuple[int, int, int, int]) -> None:
    image = np.random.default_rng(3).standard_normal(shape).astype(np.float32)

    (scaled,) = _session(build_any_size()).run(["scaled"], {"image": image})

    assert scaled.shape == shape
    np.testing.assert_allclose(scaled, image * 2 + 1, rtol=1e-6)


def test_cnn_batch_equals_items_one_by_one() -> None:
    session = _session(build_cnn())
    images = np.random.default_rng(4).standard_normal((3, 3, 32, 32))
    images = images.astype(np.float32)

    (batched,) = session.run(["logits"], {"image": images})
    one_by_one = [session.run(["logits"], {"image": img[None]})[0] for img in images]

    assert batched.shape == (3, 10)
    assert np.isfinite(batched).all()
    np.testing.assert_allclose(batched, np.concatenate(one_by_one), rtol=1e-4, atol=1e-5)


def test_write_example_repository_layout_and_bytes(tmp_path: Path) -> None:
    root = write_example_repository(tmp_path / "repo")

    assert root == tmp_path / "repo"
    assert sorted(p.name for p in root.iterdir()) == sorted(EXAMPLE_MODELS)
    for name, build in EXAMPLE_MODELS.items():
        path = root / name / "1" / "model.onnx"
        assert path.read_bytes() == build().SerializeToString(deterministic=True)
        assert list(path.parent.iterdir()) == [path]  # no temp files left
    other = write_example_repository(tmp_path / "other")
    for name in EXAMPLE_MODELS:
        relative = Path(name, "1", "model.onnx")
        assert (root / relative).read_bytes() == (other / relative).read_bytes()


def test_write_example_repository_skips_identical_and_fixes_changed(
    tmp_path: Path,
) -> None:
    write_example_repository(tmp_path, ["mlp", "adder_fixed"])
    mlp = tmp_path / "mlp" / "1" / "model.onnx"
    adder = tmp_path / "adder_fixed" / "1" / "model.onnx"
    mlp_inode = mlp.stat().st_ino
    adder.write_bytes(b"stale")

    write_example_repository(tmp_path, ["mlp", "adder_fixed"])

    assert mlp.stat().st_ino == mlp_inode  # identical file left alone
    assert adder.read_bytes() == build_fixed_adder().SerializeToString(deterministic=True)
    assert not (tmp_path / "cnn").exists()


def test_write_example_repository_rejects_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resnet"):
        write_example_repository(tmp_path, ["mlp", "resnet"])
    assert not (tmp_path / "mlp").exists()


def test_default_repository_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_repository_dir() == tmp_path / "cache" / "meshserve" / "examples"

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored
    expected_home = tmp_path / "home" / ".cache" / "meshserve" / "examples"
    assert default_repository_dir() == expected_home

    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_repository_dir() == expected_home


def test_mobilenet_is_many_small_ops_and_its_batch_equals_items_one_by_one() -> None:
    model = build_mobilenet()
    ops = [node.op_type for node in model.graph.node]
    depthwise = [
        n for n in model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]
    assert len(ops) > 90
    assert len(depthwise) == 9
    assert {"HardSwish", "HardSigmoid", "GlobalAveragePool", "Mul", "Add"} <= set(ops)  # hard-swish, squeeze-excite
    session = _session(model)
    images = np.random.default_rng(6).standard_normal((3, 3, 96, 96)).astype(np.float32)

    (batched,) = session.run(["logits"], {"image": images})
    one_by_one = [session.run(["logits"], {"image": img[None]})[0] for img in images]

    assert batched.shape == (3, 100)
    assert np.isfinite(batched).all()
    assert batched.std() > 1e-3  # activations keep a sane scale through the blocks
    np.testing.assert_allclose(batched, np.concatenate(one_by_one), rtol=1e-4, atol=1e-4)


def test_the_generator_is_a_deterministic_step_that_matches_numpy() -> None:
    """The optional example generator (not served by `meshserve up`): valid ONNX,
    identical bytes twice, and one step equal to tanh(E[id] Wx + state Wh + b)."""
    model = OPTIONAL_EXAMPLES["generator"]()
    onnx.checker.check_model(model, full_check=True)
    assert model.SerializeToString(deterministic=True) == build_generator().SerializeToString(deterministic=True)
    assert "generator" not in EXAMPLE_MODELS
    w = _weights(model)
    tokens = np.array([[3], [35]], dtype=np.int64)  # 35: taken modulo the vocabulary
    state = np.random.default_rng(3).standard_normal((2, GENERATOR_HIDDEN)).astype(np.float32)

    logits, next_state = _session(model).run(["logits", "next_state"], {"token_id": tokens, "state": state})

    want_state = np.tanh(w["embedding"][tokens[:, 0] % GENERATOR_VOCAB] @ w["wx"] + state @ w["wh"] + w["b"])
    np.testing.assert_allclose(next_state, want_state, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, want_state @ w["wo"] + w["bo"], rtol=1e-4, atol=1e-4)
