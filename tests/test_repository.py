"""The model repository reader, on real files under tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from meshserve.devkit.examples import build_fixed_adder, build_mlp, write_example_repository
from meshserve.models.repository import (
    ModelInfo,
    PlacementConfig,
    RepositoryError,
    TensorInfo,
    load_model,
    scan_repository,
)
from meshserve.platform.mig import MigProfile, parse_mig_profile


def _by_name(models: list[ModelInfo]) -> dict[str, ModelInfo]:
    """Index scanned models by name (each test repository holds one version each)."""
    return {info.name: info for info in models}


def _write(model: onnx.ModelProto, path: Path) -> Path:
    """Serialize ``model`` to ``path``, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def _write_config(model_dir: Path, text: str) -> None:
    """Write ``<model_dir>/config.yaml``."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.yaml").write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelInfo]:
    """The four example models, scanned once for the module."""
    root = write_example_repository(tmp_path_factory.mktemp("examples"))
    models, problems = scan_repository(root)
    assert problems == []
    return _by_name(models)


# --- inference from the graph ------------------------------------------------------


def test_scan_returns_examples_sorted(examples: dict[str, ModelInfo]) -> None:
    assert list(examples) == ["adder_fixed", "cnn", "mlp", "scale_any"]
    for info in examples.values():
        assert info.version == 1
        assert info.path.is_absolute()
        assert info.path.name == "model.onnx"
        assert info.platform == "onnxruntime_onnx"


def test_mlp_is_inferred_batchable_with_defaults(
    examples: dict[str, ModelInfo],
) -> None:
    mlp = examples["mlp"]
    assert mlp.inputs == (TensorInfo("features", "FP32", (-1, 64)),)
    assert mlp.outputs == (
        TensorInfo("logits", "FP32", (-1, 10)),
        TensorInfo("probabilities", "FP32", (-1, 10)),
    )
    assert mlp.max_batch_size == 32
    assert mlp.max_queue_delay_us == 2000
    assert mlp.preferred_batch_sizes == ()
    assert mlp.max_queue_size == 0


def test_cnn_shapes(examples: dict[str, ModelInfo]) -> None:
    cnn = examples["cnn"]
    assert cnn.inputs == (TensorInfo("image", "FP32", (-1, 3, 32, 32)),)
    assert cnn.outputs == (TensorInfo("logits", "FP32", (-1, 10)),)
    assert cnn.max_batch_size == 8  # its config.yaml; the graph alone would give 32


def test_fixed_adder_is_not_batchable(examples: dict[str, ModelInfo]) -> None:
    adder = examples["adder_fixed"]
    assert adder.inputs == (
        TensorInfo("a", "INT64", (1, 4)),
        TensorInfo("b", "INT64", (1, 4)),
    )
    assert adder.outputs == (
        TensorInfo("sum", "INT64", (1, 4)),
        TensorInfo("diff", "INT64", (1, 4)),
    )
    assert adder.max_batch_size == 0
    assert adder.max_queue_delay_us == 0


def test_symbolic_inner_dims_become_minus_one(examples: dict[str, ModelInfo]) -> None:
    scale = examples["scale_any"]
    assert scale.inputs == (TensorInfo("image", "FP32", (-1, 1, -1, -1)),)
    assert scale.outputs == (TensorInfo("scaled", "FP32", (-1, 1, -1, -1)),)
    assert scale.max_batch_size == 32


def test_load_model_agrees_with_scan(examples: dict[str, ModelInfo]) -> None:
    mlp = examples["mlp"]
    assert load_model(mlp.path.parent.parent, 1) == mlp


def test_initializers_listed_as_inputs_are_not_inputs(tmp_path: Path) -> None:
    model = build_mlp()
    weight = next(init for init in model.graph.initializer if init.name == "w1")
    model.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, list(weight.dims)))
    _write(model, tmp_path / "old_style" / "1" / "model.onnx")

    info = load_model(tmp_path / "old_style", 1)

    assert [t.name for t in info.inputs] == ["features"]
    assert info.max_batch_size == 32


def test_fixed_output_dim0_makes_model_not_batchable(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=1)],
        "reduce",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 1])],
    )
    _write(helper.make_model(graph), tmp_path / "reduce" / "1" / "model.onnx")

    assert load_model(tmp_path / "reduce", 1).max_batch_size == 0


def test_unsupported_element_type_names_the_tensor(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["z"], ["out"])],
        "complex",
        [helper.make_tensor_value_info("z", TensorProto.COMPLEX64, ["n", 2])],
        [helper.make_tensor_value_info("out", TensorProto.COMPLEX64, ["n", 2])],
    )
    _write(helper.make_model(graph), tmp_path / "complex" / "1" / "model.onnx")

    with pytest.raises(RepositoryError, match=r"input 'z'.*COMPLEX64"):
        load_model(tmp_path / "complex", 1)


# --- config.yaml ---------------------------------------------------------------------


def test_config_overrides_batching_and_platform(tmp_path: Path) -> None:
    write_example_repository(tmp_path, ["mlp"])
    _write_config(
        tmp_path / "mlp",
        "max_batch_size: 8\n"
        "dynamic_batching:\n"
        "  max_queue_delay_ms: 0.5\n"
        "  preferred_batch_sizes: [8, 4]\n"
        "  max_queue_size: 100\n"
        "platform: onnxruntime_onnx\n",
    )

    info = load_model(tmp_path / "mlp", 1)

    assert info.max_batch_size == 8
    assert info.max_queue_delay_us == 500
    assert info.preferred_batch_sizes == (4, 8)
    assert info.max_queue_size == 100


def test_config_sets_the_execution_timeout_and_instances(tmp_path: Path) -> None:
    write_example_repository(tmp_path, ["mlp", "cnn"])
    _write_config(tmp_path / "mlp", "execution_timeout_ms: 1500\ninstances: 3\n")

    info = load_model(tmp_path / "mlp", 1)
    default = load_model(tmp_path / "cnn", 1)

    assert (info.execution_timeout_ms, info.instances) == (1500, 3)
    assert (default.execution_timeout_ms, default.instances) == (0, 1)  # 0: derived from the warm-up


def test_partial_config_keeps_defaults(tmp_path: Path) -> None:
    write_example_repository(tmp_path, ["mlp"])
    _write_config(tmp_path / "mlp", "dynamic_batching:\n  max_queue_size: 7\n")

    info = load_model(tmp_path / "mlp", 1)

    assert (info.max_batch_size, info.max_queue_delay_us) == (32, 2000)
    assert info.max_queue_size == 7


def test_empty_config_is_no_config(tmp_path: Path) -> None:
    write_example_repository(tmp_path, ["mlp"])
    _write_config(tmp_path / "mlp", "# nothing yet\n")

    assert load_model(tmp_path / "mlp", 1).max_batch_size == 32


def test_max_batch_size_zero_disables_batching(tmp_path: Path) -> None:
    write_example_repository(tmp_path, ["mlp"])
    _write_config(tmp_path / "mlp", "max_batch_size: 0\n")

    info = load_model(tmp_path / "mlp", 1)

    assert info.max_batch_size == 0
    assert info.max_queue_delay_us == 0


def test_bad_yaml_reports_the_line(tmp_path: Path) -> None:
    write_example_repository(tmp_path, ["mlp"])
    _write_config(
        tmp_path / "mlp",
        "max_batch_size: 8\ndynamic_batching:\n  max_queue_delay_ms: 1\n preferred_batch_sizes: [4]\n",
    )

    with pytest.raises(RepositoryError, match=r"config\.yaml: invalid YAML at line 4"):
        load_model(tmp_path / "mlp", 1)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("max_batch: 8\n", "'max_batch'"),
        ("dynamic_batching:\n  delay_ms: 3\n", "'dynamic_batching.delay_ms'"),
    ],
)
def test_unknown_key_is_named(tmp_path: Path, text: str, key: str) -> None:
    write_example_repository(tmp_path, ["mlp"])
    _write_config(tmp_path / "mlp", text)

    with pytest.raises(RepositoryError, match="unknown key") as caught:
        load_model(tmp_path / "mlp", 1)
    assert key in str(caught.value)
    assert str(tmp_path / "mlp" / "config.yaml") in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "max_batch_size: -1\n",
        "max_batch_size: true\n",
        "max_batch_size: 4\ndynamic_batching:\n  preferred_batch_sizes: [2, 8]\n",
        "dynamic_batching:\n  max_queue_delay_ms: fast\n",
        "dynamic_batching: [1]\n",
        "versions: one\n",
        "platform: 3\n",
        "- max_batch_size\n",
        "instances: 0\n",
        "instances: two\n",
        "execution_timeout_ms: -5\n",
    ],
)
def test_invalid_values_are_rejected(tmp_path: Path, text: str) -> None:
    write_example_repository(tmp_path, ["mlp"])
    _write_config(tmp_path / "mlp", text)

    with pytest.raises(RepositoryError, match=r"config\.yaml"):
        load_model(tmp_path / "mlp", 1)


def test_batch_size_on_fixed_model_is_rejected(tmp_path: Path) -> None:
    write_example_repository(tmp_path, ["adder_fixed", "mlp"])
    _write_config(tmp_path / "adder_fixed", "max_batch_size: 4\n")

    with pytest.raises(RepositoryError, match="not a batch dimension"):
        load_model(tmp_path / "adder_fixed", 1)
    models, problems = scan_repository(tmp_path)
    assert [m.name for m in models] == ["mlp"]
    assert len(problems) == 1
    assert "adder_fixed" in problems[0]


# --- versions ------------------------------------------------------------------------


def _versioned_repository(root: Path) -> Path:
    """Make model "m" with versions 1..3, plus dirs and files that are not versions."""
    model_dir = root / "m"
    for version in (1, 2, 3):
        _write(build_fixed_adder(), model_dir / str(version) / "model.onnx")
    for not_a_version in ("0", "01", "-1", "latest", "v2"):
        _write(build_fixed_adder(), model_dir / not_a_version / "model.onnx")
    (model_dir / "4").write_text("a file, not a directory")
    return model_dir


def test_all_integer_version_dirs_are_served(tmp_path: Path) -> None:
    _versioned_repository(tmp_path)

    models, problems = scan_repository(tmp_path)

    assert [(m.name, m.version) for m in models] == [("m", 1), ("m", 2), ("m", 3)]
    assert problems == []


def test_versions_config_filters(tmp_path: Path) -> None:
    model_dir = _versioned_repository(tmp_path)
    _write_config(model_dir, "versions: [3, 1]\n")

    models, problems = scan_repository(tmp_path)

    assert [m.version for m in models] == [1, 3]
    assert problems == []
    with pytest.raises(RepositoryError, match="version 2 is not listed"):
        load_model(model_dir, 2)


def test_versions_config_naming_a_missing_version_is_a_problem(tmp_path: Path) -> None:
    model_dir = _versioned_repository(tmp_path)
    _write_config(model_dir, "versions: [2, 9]\n")

    models, problems = scan_repository(tmp_path)

    assert [m.version for m in models] == [2]
    assert len(problems) == 1
    assert "[9]" in problems[0]


def test_scan_skips_bad_models_and_keeps_going(tmp_path: Path) -> None:
    write_example_repository(tmp_path, ["mlp", "scale_any"])
    (tmp_path / "garbage" / "1").mkdir(parents=True)
    (tmp_path / "garbage" / "1" / "model.onnx").write_bytes(b"\xff not protobuf \x00")
    (tmp_path / "torch" / "1").mkdir(parents=True)
    (tmp_path / "torch" / "1" / "model.pt").write_bytes(b"pickle would go here")
    (tmp_path / "empty").mkdir()
    _write_config(tmp_path / "badyaml", "max_batch_size: [\n")
    (tmp_path / "README.txt").write_text("not a model")
    (tmp_path / ".hidden" / "1").mkdir(parents=True)

    models, problems = scan_repository(tmp_path)

    assert [m.name for m in models] == ["mlp", "scale_any"]
    assert len(problems) == 4
    joined = "\n".join(problems)
    assert "garbage" in joined
    assert "not a readable ONNX model" in joined
    assert "torch" in joined
    assert "no model.onnx" in joined
    assert "empty" in joined
    assert "badyaml" in joined


def test_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="not a directory"):
        scan_repository(tmp_path / "nowhere")


# --- untrusted files: external data and symlinks --------------------------------------


def _save_external(model_dir: Path, location: str = "weights.bin") -> Path:
    """Save the mlp with every initializer in ``1/<location>``; return model.onnx."""
    path = model_dir / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save_model(
        build_mlp(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def _point_external_data_at(path: Path, location: str) -> None:
    """Rewrite every external-data location in the model file at ``path``."""
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def test_external_data_inside_the_version_dir_loads(tmp_path: Path) -> None:
    path = _save_external(tmp_path / "ext")
    assert (path.parent / "weights.bin").stat().st_size > 0

    info = load_model(tmp_path / "ext", 1)

    assert info.max_batch_size == 32
    session = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(build_mlp().SerializeToString(), providers=["CPUExecutionProvider"])
    features = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(
        session.run(["logits"], {"features": features})[0],
        reference.run(["logits"], {"features": features})[0],
    )


def test_external_data_with_dotdot_is_refused(tmp_path: Path) -> None:
    path = _save_external(tmp_path / "ext")
    shutil.move(path.parent / "weights.bin", tmp_path / "ext" / "weights.bin")
    _point_external_data_at(path, "../weights.bin")

    with pytest.raises(RepositoryError, match=r"'\.\./weights\.bin' points outside"):
        load_model(tmp_path / "ext", 1)
    models, problems = scan_repository(tmp_path)
    assert models == []
    assert "points outside the model directory" in problems[0]


def test_external_data_with_absolute_path_is_refused(tmp_path: Path) -> None:
    path = _save_external(tmp_path / "ext")
    # Absolute even when it names the very file inside the version directory.
    _point_external_data_at(path, str(path.parent / "weights.bin"))

    with pytest.raises(RepositoryError, match="points outside the model directory"):
        load_model(tmp_path / "ext", 1)


def test_external_data_through_symlink_out_is_refused(tmp_path: Path) -> None:
    path = _save_external(tmp_path / "ext")
    outside = tmp_path / "secrets"
    outside.mkdir()
    shutil.move(path.parent / "weights.bin", outside / "weights.bin")
    (path.parent / "weights.bin").symlink_to(outside / "weights.bin")

    with pytest.raises(RepositoryError, match=r"'weights\.bin' points outside"):
        load_model(tmp_path / "ext", 1)


def test_model_file_symlinked_outside_is_refused(tmp_path: Path) -> None:
    target = _write(build_mlp(), tmp_path / "elsewhere" / "model.onnx")
    (tmp_path / "repo" / "linked" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "linked" / "1" / "model.onnx").symlink_to(target)

    with pytest.raises(RepositoryError, match="outside the model directory"):
        load_model(tmp_path / "repo" / "linked", 1)


def test_model_file_symlinked_to_another_version_is_allowed(tmp_path: Path) -> None:
    model_dir = tmp_path / "aliased"
    _write(build_mlp(), model_dir / "1" / "model.onnx")
    (model_dir / "2").mkdir()
    (model_dir / "2" / "model.onnx").symlink_to(Path("..", "1", "model.onnx"))

    models, problems = scan_repository(tmp_path)

    assert [m.version for m in models] == [1, 2]
    assert problems == []


# --- placement -----------------------------------------------------------------------


def test_placement_defaults_and_weights_from_the_version_directory(tmp_path: Path) -> None:
    write_example_repository(tmp_path, ["mlp"])
    (tmp_path / "mlp" / "1" / "weights.bin").write_bytes(b"\0" * 1000)  # as external data would lie

    info = load_model(tmp_path / "mlp", 1)

    assert info.placement == PlacementConfig(device="any", min_mig_profile=None, memory_bytes=None)
    assert info.weights_bytes == info.path.stat().st_size + 1000


def test_placement_section_is_read(tmp_path: Path) -> None:
    write_example_repository(tmp_path, ["mlp"])
    _write_config(tmp_path / "mlp", "placement:\n  device: gpu\n  min_mig_profile: 2g.20gb\n  memory_mb: 512\n")

    assert load_model(tmp_path / "mlp", 1).placement == PlacementConfig("gpu", "2g.20gb", 512 * 2**20)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("placement:\n  gpu: true\n", "unknown key 'placement.gpu'"),
        ("placement: gpu\n", "'placement' must be a mapping"),
        ("placement:\n  device: tpu\n", "'placement.device' must be one of gpu, cpu, any, got 'tpu'"),
        ("placement:\n  min_mig_profile: 20gb\n", "'placement.min_mig_profile' must be a MIG profile"),
        ("placement:\n  min_mig_profile: 2\n", "'placement.min_mig_profile' must be a MIG profile"),
        ("placement:\n  device: cpu\n  min_mig_profile: 1g.10gb\n", "'placement.device' is cpu"),
        ("placement:\n  memory_mb: 0\n", "'placement.memory_mb' must be a positive integer (MiB), got 0"),
        ("placement:\n  memory_mb: 1.5\n", "'placement.memory_mb' must be a positive integer"),
        ("placement:\n  memory_mb: true\n", "'placement.memory_mb' must be a positive integer"),
    ],
)
def test_invalid_placement_is_rejected(tmp_path: Path, text: str, problem: str) -> None:
    write_example_repository(tmp_path, ["mlp"])
    _write_config(tmp_path / "mlp", text)

    with pytest.raises(RepositoryError) as caught:
        load_model(tmp_path / "mlp", 1)
    assert str(caught.value).startswith(str(tmp_path / "mlp" / "config.yaml"))
    assert problem in str(caught.value)


def test_mig_profiles_compare_by_compute_and_memory() -> None:
    small, large = parse_mig_profile("1g.10gb"), parse_mig_profile("3g.40gb")
    assert small == MigProfile(1, 10)
    assert parse_mig_profile("1g.10gb+me") == small
    assert large is not None
    assert small is not None
    assert large.covers(small)
    assert not small.covers(large)
    assert not MigProfile(3, 20).covers(MigProfile(2, 40))
    assert parse_mig_profile("20gb") is None
