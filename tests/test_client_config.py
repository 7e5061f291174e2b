"""ModelConfig tells clients what config.yaml says (gateway/model_config.py): input
formats, output label files, dynamic batching, instance groups, the version policy;
on the real in-process mesh, and config.yaml's checks of the new sections."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from gateway.model_config import model_config
from meshserve.devkit.examples import write_example_repository
from meshserve.errors import InvalidArgument
from meshserve.models.repository import RepositoryError, load_model
from protos import grpc_service_pb2 as pb
from protos import model_config_pb2 as mc
from router.model_config import parse_triton_config
from tests.support import infer_stub, start_mesh, stop_mesh

CNN_CONFIG = """\
max_batch_size: 8
dynamic_batching: {max_queue_delay_ms: 1.5, preferred_batch_sizes: [4, 8], max_queue_size: 100}
instances: 2
placement: {device: cpu}
version_policy: {latest: 1}
input: [{name: image, format: NCHW}]
output: [{name: logits, label_filename: labels.txt}]
"""


def write_classifier(root: Path, config: str = CNN_CONFIG) -> Path:
    """The example "cnn" with a config.yaml for an image-classification client."""
    write_example_repository(root, ["cnn"])
    (root / "cnn" / "labels.txt").write_text("".join(f"class{i}\n" for i in range(10)))
    (root / "cnn" / "config.yaml").write_text(config)
    return root


async def test_model_config_reports_every_field(redis_url: str, tmp_path: Path) -> None:
    mesh = await start_mesh(redis_url, write_classifier(tmp_path))
    try:
        async with grpc.aio.insecure_channel(mesh.gateway.address) as channel:
            response = await infer_stub(channel).ModelConfig(pb.ModelConfigRequest(name="cnn"), timeout=10)
    finally:
        await stop_mesh(mesh)
    config = response.config
    assert (config.platform, config.backend, config.max_batch_size) == ("onnxruntime_onnx", "onnxruntime", 8)
    (image,) = config.input
    assert (image.name, image.format, list(image.dims)) == ("image", mc.ModelInput.FORMAT_NCHW, [3, 32, 32])
    assert image.data_type == mc.TYPE_FP32
    (logits,) = config.output
    assert (logits.name, logits.label_filename, list(logits.dims)) == ("logits", "labels.txt", [10])
    batching = config.dynamic_batching
    assert batching.max_queue_delay_microseconds == 1500
    assert list(batching.preferred_batch_size) == [4, 8]
    assert batching.default_queue_policy.max_queue_size == 100
    (group,) = config.instance_group
    assert (group.count, group.kind) == (2, mc.ModelInstanceGroup.KIND_CPU)
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1


def test_defaults_without_config(tmp_path: Path) -> None:
    write_example_repository(tmp_path, ["mlp"])
    config = model_config(load_model(tmp_path / "mlp", 1))
    assert config.input[0].format == mc.ModelInput.FORMAT_NONE
    assert config.output[0].label_filename == ""
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert (config.instance_group[0].count, config.instance_group[0].kind) == (1, mc.ModelInstanceGroup.KIND_AUTO)
    assert not config.model_transaction_policy.decoupled


def test_specific_policy_and_nhwc(tmp_path: Path) -> None:
    write_classifier(tmp_path, "version_policy: {specific: [1]}\ninput: [{name: image, format: NHWC}]\n")
    config = model_config(load_model(tmp_path / "cnn", 1))
    assert list(config.version_policy.specific.versions) == [1]
    assert config.input[0].format == mc.ModelInput.FORMAT_NHWC


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("input: [{name: image, format: CHW}]\n", "'input[0].format' must be one of NCHW, NHWC"),
        ("input: [{name: image, layout: NCHW}]\n", "unknown key 'input[0].layout'"),
        ("input: [{name: pixels, format: NCHW}]\n", "'input' 'pixels': the graph has no input 'pixels'"),
        ("input: {image: {format: NCHW}}\n", "'input' must be a list of entries with a name"),
        ("input: [{name: image, datatype: FP32}]\n", "datatype and dims are declared for 'backend: python' only"),
        ("output: [{name: logits, label_filename: missing.txt}]\n", "no file 'missing.txt'"),
        ("output: [{name: logits, label_filename: ../labels.txt}]\n", "must be a plain file name"),
        ("output: [{name: probs, label_filename: labels.txt}]\n", "the graph has no output 'probs'"),
        ("output: [{name: logits, labels: labels.txt}]\n", "unknown key 'output[0].labels'"),
    ],
)
def test_config_yaml_sections_are_checked(tmp_path: Path, config: str, message: str) -> None:
    write_classifier(tmp_path, config)
    with pytest.raises(RepositoryError, match=r"config\.yaml") as refused:
        load_model(tmp_path / "cnn", 1)
    assert message in str(refused.value)


def test_format_needs_three_dims(tmp_path: Path) -> None:
    write_example_repository(tmp_path, ["mlp"])
    (tmp_path / "mlp" / "config.yaml").write_text("input: [{name: features, format: NCHW}]\n")
    with pytest.raises(RepositoryError, match="needs 3 dims beside the batch dim, the graph's input has 1"):
        load_model(tmp_path / "mlp", 1)


def test_triton_json_config_format_and_labels_map_onto_config_yaml() -> None:
    config = parse_triton_config(
        json.dumps(
            {
                "input": [{"name": "image", "format": "FORMAT_NCHW"}, {"name": "mask", "format": "FORMAT_NONE"}],
                "output": [{"name": "logits", "label_filename": "labels.txt"}],
            }
        ),
        "cnn",
    )
    assert config.yaml == {
        "input": [{"name": "image", "format": "NCHW"}],
        "output": [{"name": "logits", "label_filename": "labels.txt"}],
    }
    with pytest.raises(InvalidArgument, match=r"config 'output\[0\]\.format'"):
        parse_triton_config(json.dumps({"output": [{"name": "logits", "format": "FORMAT_NCHW"}]}), "cnn")
