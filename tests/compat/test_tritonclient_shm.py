"""What tritonclient's own examples do, unchanged: an image-classification client that
takes its layout from ModelConfig, and system shared memory (tritonclient.utils.
shared_memory) with inputs and outputs in regions, per tenant; `meshserve up` with a
tenants file, in a subprocess (see test_tritonclient.py for why)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
import tritonclient.grpc.model_config_pb2 as mc
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from meshserve.devkit.examples import write_example_repository
from meshserve.tenancy.tenants import hash_key
from tests.compat.test_tritonclient import RunningMesh, meshserve_up

RUN = uuid.uuid4().hex[:8]
ACME, GLOBEX = f"/ms-{RUN}-acme-", f"/ms-{RUN}-globex-"
TENANTS = f"""
tenants:
  - name: acme
    api_keys: ["{hash_key("acme-key")}"]
    models: ["*"]
    shared_memory: {{allowed: true, key_prefix: "{ACME}"}}
  - name: globex
    api_keys: ["{hash_key("globex-key")}"]
    models: ["*"]
    shared_memory: {{allowed: true, key_prefix: "{GLOBEX}"}}
"""
CLASSIFIER_CONFIG = """\
max_batch_size: 8
input: [{name: image, format: NCHW}]
output: [{name: logits, label_filename: labels.txt}]
"""
ACME_HEADERS = {"authorization": "Bearer acme-key"}
GLOBEX_HEADERS = {"authorization": "Bearer globex-key"}
A = np.array([[1, 2, 3, 4]], np.int64)
B = np.array([[10, 20, 30, 40]], np.int64)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    root = tmp_path_factory.mktemp("shm")
    repository = write_example_repository(root / "models", ["cnn", "adder_fixed"])
    (repository / "cnn" / "config.yaml").write_text(CLASSIFIER_CONFIG)
    (repository / "cnn" / "labels.txt").write_text("".join(f"class{i}\n" for i in range(10)))
    (root / "tenants.yaml").write_text(TENANTS)
    with meshserve_up(repository, 2, ("--tenants", str(root / "tenants.yaml"))) as running:
        yield running


def parse_model(model_metadata: object, model_config: object) -> tuple[int, str, str, int, int, int, int, str]:
    """Triton's image_client.py parse_model, as its users run it (protobuf answers)."""
    input_metadata = model_metadata.inputs[0]  # type: ignore[attr-defined]
    input_config = model_config.input[0]  # type: ignore[attr-defined]
    output_metadata = model_metadata.outputs[0]  # type: ignore[attr-defined]
    max_batch_size = model_config.max_batch_size  # type: ignore[attr-defined]
    input_batch_dim = max_batch_size > 0
    expected_input_dims = 3 + (1 if input_batch_dim else 0)
    if len(input_metadata.shape) != expected_input_dims:
        raise ValueError(f"expecting input to have {expected_input_dims} dimensions")
    if input_config.format not in (mc.ModelInput.FORMAT_NCHW, mc.ModelInput.FORMAT_NHWC):
        raise ValueError("unexpected input format " + mc.ModelInput.Format.Name(input_config.format))
    if input_config.format == mc.ModelInput.FORMAT_NHWC:
        h, w, c = input_metadata.shape[1 if input_batch_dim else 0 :]
    else:
        c, h, w = input_metadata.shape[1 if input_batch_dim else 0 :]
    return (
        max_batch_size,
        input_metadata.name,
        output_metadata.name,
        c,
        h,
        w,
        input_config.format,
        input_metadata.datatype,
    )


def test_image_classification_client_reads_its_layout(mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(mesh.address)
    metadata = client.get_model_metadata("cnn", headers=ACME_HEADERS)
    config = client.get_model_config("cnn", headers=ACME_HEADERS).config
    max_batch, input_name, output_name, c, h, w, layout, dtype = parse_model(metadata, config)
    assert (max_batch, input_name, output_name, layout, dtype) == (
        8,
        "image",
        "logits",
        mc.ModelInput.FORMAT_NCHW,
        "FP32",
    )
    assert config.output[0].label_filename == "labels.txt"
    assert config.instance_group[0].count == 1
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    image = np.random.default_rng(0).random((1, c, h, w), np.float32)
    inp = tc.InferInput(input_name, list(image.shape), dtype)
    inp.set_data_from_numpy(image)
    logits = client.infer("cnn", [inp], headers=ACME_HEADERS).as_numpy(output_name)
    assert logits.shape == (1, 10)
    # image_client.py's request and postprocess: class_count=k, "value:index:label"
    k = 3
    output = tc.InferRequestedOutput(output_name, class_count=k)
    results = client.infer("cnn", [inp], outputs=[output], headers=ACME_HEADERS).as_numpy(output_name)
    assert results.shape == (1, k)
    parsed = []
    for row in results:
        for result in row:
            cls = "".join(chr(x) for x in result).split(":") if results.dtype.type == np.object_ else result.split(":")
            parsed.append((float(cls[0]), int(cls[1]), cls[2]))
    order = np.argsort(-logits[0], kind="stable")[:k]
    assert [index for _, index, _ in parsed] == order.tolist()
    assert [label for _, _, label in parsed] == [f"class{i}" for i in order]
    np.testing.assert_allclose([value for value, _, _ in parsed], logits[0][order], atol=1e-6)


async def test_asyncio_client_asks_for_the_top_classes(mesh: RunningMesh) -> None:
    client = tc_aio.InferenceServerClient(mesh.address)
    try:
        assert "classification" in (await client.get_server_metadata(headers=ACME_HEADERS)).extensions
        image = np.random.default_rng(1).random((2, 3, 32, 32), np.float32)
        inp = tc.InferInput("image", list(image.shape), "FP32")
        inp.set_data_from_numpy(image)
        logits = (await client.infer("cnn", [inp], headers=ACME_HEADERS)).as_numpy("logits")
        output = tc.InferRequestedOutput("logits", class_count=50)  # over the 10 classes: all of them
        ranked = (await client.infer("cnn", [inp], outputs=[output], headers=ACME_HEADERS)).as_numpy("logits")
        assert ranked.shape == (2, 10)
        for row, texts in zip(logits, ranked, strict=True):
            order = np.argsort(-row, kind="stable")
            assert [t.decode() for t in texts] == [f"{float(row[i]):f}:{i}:class{i}" for i in order]
    finally:
        await client.close()


def test_sync_shared_memory_inputs_and_outputs_per_tenant(mesh: RunningMesh) -> None:
    client = tc.InferenceServerClient(mesh.address)
    ip = shm.create_shared_memory_region("in", f"{ACME}in", A.nbytes)
    op = shm.create_shared_memory_region("out", f"{ACME}out", 64)
    try:
        shm.set_shared_memory_region(ip, [A])
        client.register_system_shared_memory("in", f"{ACME}in", A.nbytes, headers=ACME_HEADERS)
        client.register_system_shared_memory("out", f"{ACME}out", 64, headers=ACME_HEADERS)
        status = client.get_system_shared_memory_status(headers=ACME_HEADERS, as_json=True)
        assert sorted(status["regions"]) == ["in", "out"]

        a = tc.InferInput("a", [1, 4], "INT64")
        a.set_shared_memory("in", A.nbytes)
        b = tc.InferInput("b", [1, 4], "INT64")
        b.set_data_from_numpy(B)
        total = tc.InferRequestedOutput("sum")
        total.set_shared_memory("out", 32)
        result = client.infer(
            "adder_fixed", [a, b], outputs=[total, tc.InferRequestedOutput("diff")], headers=ACME_HEADERS
        )
        np.testing.assert_array_equal(result.as_numpy("diff"), A - B)
        written = result.get_output("sum")
        assert list(written.shape) == [1, 4]
        np.testing.assert_array_equal(shm.get_contents_as_numpy(op, np.int64, [1, 4]), A + B)

        # globex sees none of acme's regions, cannot use them, nor map acme's keys
        assert client.get_system_shared_memory_status(headers=GLOBEX_HEADERS, as_json=True).get("regions", {}) == {}
        with pytest.raises(InferenceServerException, match="no shared memory region 'in'"):
            client.infer("adder_fixed", [a, b], headers=GLOBEX_HEADERS)
        with pytest.raises(InferenceServerException, match="key_prefix") as refused:
            client.register_system_shared_memory("in", f"{ACME}in", A.nbytes, headers=GLOBEX_HEADERS)
        assert refused.value.status() == "StatusCode.PERMISSION_DENIED"

        client.unregister_system_shared_memory(headers=ACME_HEADERS)
        assert client.get_system_shared_memory_status(headers=ACME_HEADERS, as_json=True).get("regions", {}) == {}
    finally:
        shm.destroy_shared_memory_region(ip)
        shm.destroy_shared_memory_region(op)


async def test_asyncio_shared_memory_and_cuda_refusal(mesh: RunningMesh) -> None:
    client = tc_aio.InferenceServerClient(mesh.address)
    region = shm.create_shared_memory_region("io", f"{GLOBEX}io", 64)
    try:
        shm.set_shared_memory_region(region, [A])
        await client.register_system_shared_memory("io", f"{GLOBEX}io", 64, headers=GLOBEX_HEADERS)
        a = tc.InferInput("a", [1, 4], "INT64")
        a.set_shared_memory("io", A.nbytes)
        b = tc.InferInput("b", [1, 4], "INT64")
        b.set_data_from_numpy(B)
        diff = tc.InferRequestedOutput("diff")
        diff.set_shared_memory("io", 32, offset=32)
        await client.infer("adder_fixed", [a, b], outputs=[diff], headers=GLOBEX_HEADERS)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(region, np.int64, [1, 4], offset=32), A - B)
        status = await client.get_system_shared_memory_status("io", headers=GLOBEX_HEADERS, as_json=True)
        assert status["regions"]["io"]["key"] == f"{GLOBEX}io"
        await client.unregister_system_shared_memory("io", headers=GLOBEX_HEADERS)
        with pytest.raises(InferenceServerException, match="CUDA shared memory: the gateway holds no GPU"):
            await client.register_cuda_shared_memory("g", base64.b64encode(b"handle"), 0, 64, headers=GLOBEX_HEADERS)
        metadata = await client.get_server_metadata(as_json=True)
        assert "system_shared_memory" in metadata["extensions"]
    finally:
        shm.destroy_shared_memory_region(region)
        await client.close()
