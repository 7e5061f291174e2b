"""Execution providers per model and device: config, provider options, and fallback.

The GPU chains are checked as values (with an injected list of available providers)
and the fallback for real, down to the CPU. What ONNX Runtime reports decides the
rest: on a CPU-only build (the base dependency) the fallback runs against its own
provider list; on onnxruntime-gpu (``ort.get_device() == "GPU"``) the fallback is
given that list without the GPU providers, the CPU-only runtime it is about, and
the ``gpu`` test runs where ONNX Runtime offers CUDA.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from meshserve.devkit.examples import write_example_repository
from meshserve.models.execution import DEFAULT_EXECUTION, CudaConfig, ExecutionConfig, TensorRTConfig
from meshserve.models.repository import ModelInfo, RepositoryError, load_model
from model_workers import engines
from model_workers.engines import CPU, CUDA, TENSORRT, provider_chain
from model_workers.session import LoadedModel

ALL = [TENSORRT, CUDA, CPU]
GPU_RUNTIME = ort.get_device() == "GPU" or CUDA in ort.get_available_providers()
"""onnxruntime-gpu: it builds sessions on the GPU providers instead of ignoring them."""


NO_GPU_BECAUSE = (
    "ONNX Runtime offers no CUDA here"
    if CUDA not in ort.get_available_providers()
    else "onnxruntime-gpu, but no NVIDIA driver here"
    if not Path("/dev/nvidiactl").exists()
    else ""
)
"""Why the ``gpu`` test cannot run here; empty where it can."""


def cpu_only_providers() -> list[str] | None:
    """What a CPU-only ONNX Runtime offers: None (its own list) where this is one,
    else this runtime's list without the GPU providers."""
    if not GPU_RUNTIME:
        return None
    return [name for name in ort.get_available_providers() if name not in (TENSORRT, CUDA)]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return write_example_repository(tmp_path / "models", ["cnn", "mlp", "scale_any", "adder_fixed"])


def _load(repo: Path, name: str, config: str = "") -> ModelInfo:
    if config:
        (repo / name / "config.yaml").write_text(config, encoding="utf-8")
    return load_model(repo / name, 1)


def _cuda_defaults(**extra: str) -> dict[str, str]:
    return {
        "device_id": "0",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kSameAsRequested",
        **extra,
    }


# --- provider_chain ------------------------------------------------------------------


def test_a_cpu_device_gets_only_the_cpu_provider(model_repository: Path) -> None:
    info = load_model(model_repository / "cnn", 1)
    assert provider_chain(info.execution, "cpu", ALL, info, warned=set()) == [(CPU, {})]


def test_a_gpu_gets_tensorrt_then_cuda_then_cpu_with_a_batch_profile(model_repository: Path) -> None:
    cnn = load_model(model_repository / "cnn", 1)  # max_batch_size 8 (its config.yaml), no preferred sizes
    cache = str(Path.home() / ".cache" / "meshserve" / "trt" / "cnn" / "1")
    assert provider_chain(cnn.execution, "cuda:0", ALL, cnn, warned=set()) == [
        (
            TENSORRT,
            {
                "device_id": "0",
                "trt_fp16_enable": "False",
                "trt_int8_enable": "False",
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": cache,
                "trt_profile_min_shapes": "image:1x3x32x32",
                "trt_profile_opt_shapes": "image:8x3x32x32",
                "trt_profile_max_shapes": "image:8x3x32x32",
            },
        ),
        (CUDA, _cuda_defaults()),
        (CPU, {}),
    ]


def test_every_option_the_config_sets_reaches_onnx_runtime(repo: Path, tmp_path: Path) -> None:
    (repo / "mlp" / "calibration.flatbuffers").write_bytes(b"table")
    mlp = _load(
        repo,
        "mlp",
        f"""
max_batch_size: 16
dynamic_batching: {{preferred_batch_sizes: [4, 8]}}
execution:
  tensorrt:
    fp16: true
    int8: true
    int8_calibration_table: calibration.flatbuffers
    engine_cache_dir: {tmp_path / "engines"}
    workspace_mb: 1024
  cuda: {{memory_limit_mb: 512, cudnn_conv_algo_search: HEURISTIC}}
""",
    )
    trt, cuda, cpu = provider_chain(mlp.execution, "MIG-4f2a", ALL, mlp, warned=set())
    assert trt == (
        TENSORRT,
        {
            "device_id": "0",
            "trt_fp16_enable": "True",
            "trt_int8_enable": "True",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(tmp_path / "engines"),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(tmp_path / "engines"),
            "trt_int8_calibration_table_name": str(repo.absolute() / "mlp" / "calibration.flatbuffers"),
            "trt_max_workspace_size": str(1024 * 2**20),
            "trt_profile_min_shapes": "features:1x64",
            "trt_profile_opt_shapes": "features:8x64",
            "trt_profile_max_shapes": "features:16x64",
        },
    )
    assert cuda == (
        CUDA,
        _cuda_defaults(cudnn_conv_algo_search="HEURISTIC", gpu_mem_limit=str(512 * 2**20)),
    )
    assert cpu == (CPU, {})


def test_missing_providers_are_skipped_with_one_warning_each(
    model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    info = load_model(model_repository / "mlp", 1)
    warned: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="model_workers.engines"):
        for _ in range(2):
            assert provider_chain(info.execution, "cuda:0", [CUDA, CPU], info, warned=warned) == [
                (CUDA, _cuda_defaults()),
                (CPU, {}),
            ]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith("TensorrtExecutionProvider is configured but this ONNX Runtime does not offer it")


def test_the_configured_order_is_kept_and_cpu_always_ends_it(repo: Path) -> None:
    info = _load(repo, "mlp", "execution: {providers: [cuda, tensorrt]}")
    assert [name for name, _ in provider_chain(info.execution, "cuda:0", ALL, info, warned=set())] == [
        CUDA,
        TENSORRT,
        CPU,
    ]
    cpu_only = _load(repo, "cnn", "execution: {providers: [cpu]}")
    assert provider_chain(cpu_only.execution, "cuda:0", ALL, cpu_only, warned=set()) == [(CPU, {})]


def test_a_symbolic_non_batch_dim_gets_no_explicit_profile(
    model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    info = load_model(model_repository / "scale_any", 1)  # [batch, 1, height, width]
    with caplog.at_level(logging.INFO, logger="model_workers.engines"):
        options = engines.tensorrt_options(info.execution, info)
    assert not [key for key in options if key.startswith("trt_profile_")]
    assert "input 'image' has a symbolic non-batch dim [-1, 1, -1, -1]" in caplog.text


def test_a_model_without_a_batch_dim_needs_no_profile(model_repository: Path) -> None:
    info = load_model(model_repository / "adder_fixed", 1)
    assert engines.batch_profile(info) == {}


# --- config.yaml -----------------------------------------------------------------


def test_no_execution_section_means_the_defaults(model_repository: Path) -> None:
    assert load_model(model_repository / "cnn", 1).execution == DEFAULT_EXECUTION
    assert DEFAULT_EXECUTION.providers == ("tensorrt", "cuda", "cpu")


def test_an_execution_section_is_parsed(repo: Path, tmp_path: Path) -> None:
    info = _load(
        repo,
        "cnn",
        f"""
execution:
  providers: [cuda, cpu]
  tensorrt: {{fp16: true, engine_cache_dir: "{tmp_path / "trt"}"}}
  cuda: {{memory_limit_mb: 256}}
""",
    )
    assert info.execution == ExecutionConfig(
        providers=("cuda", "cpu"),
        tensorrt=TensorRTConfig(fp16=True, engine_cache_dir=tmp_path / "trt"),
        cuda=CudaConfig(memory_limit_bytes=256 * 2**20),
    )


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("execution: [cuda]", "'execution' must be a mapping"),
        ("execution: {provider: [cuda]}", "unknown key 'execution.provider'"),
        ("execution: {providers: [cuda, gpu]}", "'execution.providers' must be a non-empty list of distinct names"),
        ("execution: {providers: [cuda, cuda]}", "'execution.providers' must be a non-empty list of distinct names"),
        ("execution: {providers: []}", "'execution.providers' must be a non-empty list of distinct names"),
        ("execution: {tensorrt: {fp32: true}}", "unknown key 'execution.tensorrt.fp32'"),
        ("execution: {tensorrt: {fp16: 'yes'}}", "'execution.tensorrt.fp16' must be true or false, got 'yes'"),
        (
            "execution: {tensorrt: {int8_calibration_table: calibration.flatbuffers}}",
            "'execution.tensorrt.int8_calibration_table' is set but 'execution.tensorrt.int8' is not",
        ),
        (
            "execution: {tensorrt: {int8: true, int8_calibration_table: ../mlp/calibration.flatbuffers}}",
            "points outside the model directory",
        ),
        (
            "execution: {tensorrt: {int8: true, int8_calibration_table: /etc/passwd}}",
            "must be a path relative to the model directory",
        ),
        ("execution: {tensorrt: {int8: true, int8_calibration_table: missing.table}}", "no such file"),
        ("execution: {tensorrt: {engine_cache_dir: cache}}", "must be an absolute path"),
        ("execution: {tensorrt: {workspace_mb: 0}}", "'execution.tensorrt.workspace_mb' must be a positive integer"),
        ("execution: {cuda: 512}", "'execution.cuda' must be a mapping"),
        ("execution: {cuda: {memory_limit_mb: -1}}", "'execution.cuda.memory_limit_mb' must be a positive integer"),
        (
            "execution: {cuda: {cudnn_conv_algo_search: FAST}}",
            "'execution.cuda.cudnn_conv_algo_search' must be one of EXHAUSTIVE, HEURISTIC, DEFAULT, got 'FAST'",
        ),
    ],
)
def test_a_bad_execution_section_names_the_file_and_key(repo: Path, section: str, message: str) -> None:
    (repo / "mlp" / "calibration.flatbuffers").write_bytes(b"table")
    with pytest.raises(RepositoryError) as caught:
        _load(repo, "cnn", section)
    assert str(caught.value).startswith(f"{repo.absolute() / 'cnn' / 'config.yaml'}: ")
    assert message in str(caught.value)


def test_an_engine_cache_inside_the_repository_is_refused(repo: Path) -> None:
    # Engines are deserialized from the cache: a model's author must not be able to ship one.
    with pytest.raises(RepositoryError, match="is inside the model repository"):
        _load(repo, "cnn", f"execution: {{tensorrt: {{engine_cache_dir: {repo.absolute() / 'mlp'}}}}}")


# --- sessions ----------------------------------------------------------------------


def test_a_gpu_model_on_a_cpu_only_runtime_falls_back_to_the_cpu_and_serves(
    model_repository: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engines, "_warned_unavailable", set())
    info = load_model(model_repository / "cnn", 1)
    with caplog.at_level(logging.WARNING):
        model = LoadedModel(info, device="cuda:0", available=cpu_only_providers())
    assert model.providers == (CPU,)
    warned = [r.getMessage().split(" ")[0] for r in caplog.records]
    assert warned == [TENSORRT, CUDA]
    model.warm_up()
    assert model.ready
    feed = model.sample_inputs(4)
    reference = LoadedModel(info).run(feed)
    np.testing.assert_array_equal(model.run(feed)[0], reference[0])


@pytest.mark.skipif(
    GPU_RUNTIME, reason="onnxruntime-gpu builds CUDA rather than ignore it: the gpu test covers this runtime"
)
def test_a_provider_that_does_not_build_is_dropped_for_the_next(
    repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Pretend ONNX Runtime offers TensorRT and CUDA: it builds the session without them
    # (and says so with a UserWarning), which must count as each failing in turn.
    info = _load(repo, "mlp", f"execution: {{tensorrt: {{engine_cache_dir: {tmp_path / 'engines'}}}}}")
    with (
        caplog.at_level(logging.WARNING, logger="model_workers.session"),
        pytest.warns(UserWarning, match="not in available provider names"),
    ):
        model = LoadedModel(info, device="cuda:0", available=ALL)
    assert model.providers == (CPU,)
    assert [r.getMessage().split(": ", 1)[1].split(" (")[0] for r in caplog.records] == [
        f"{TENSORRT} failed on cuda:0",
        f"{CUDA} failed on cuda:0",
    ]
    assert "(EngineUnavailable: ONNX Runtime built the session on CPUExecutionProvider instead)" in caplog.text
    assert "falling back to CPUExecutionProvider" in caplog.records[-1].getMessage()
    assert (tmp_path / "engines").is_dir()  # created before TensorRT is asked to use it
    model.warm_up()
    assert model.ready


@pytest.mark.gpu
@pytest.mark.skipif(bool(NO_GPU_BECAUSE), reason=NO_GPU_BECAUSE)
@pytest.mark.parametrize(("providers", "first"), [("[cuda, cpu]", CUDA), ("[tensorrt, cuda, cpu]", TENSORRT)])
def test_a_gpu_with_io_binding_matches_the_cpu(repo: Path, tmp_path: Path, providers: str, first: str) -> None:
    info = _load(
        repo,
        "cnn",
        f"execution: {{providers: {providers}, tensorrt: {{engine_cache_dir: {tmp_path / 'engines'}}}}}",
    )
    if first not in ort.get_available_providers():
        pytest.skip(f"ONNX Runtime offers no {first} here")
    gpu = LoadedModel(info, device="cuda:0")
    assert gpu.providers[0] == first
    assert gpu.io_bound  # runs go through IO binding
    gpu.warm_up()
    cpu = LoadedModel(info)
    for batch in (1, 5, info.max_batch_size):
        feed = cpu.sample_inputs(batch)
        for got, want in zip(gpu.run(feed), cpu.run(feed), strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
