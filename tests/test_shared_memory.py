"""System shared memory (gateway/shm.py): regions registered per tenant, inputs read
from them and outputs written into them, every offset checked; on the real in-process
mesh with a tenants file, and the registry's refusals on their own."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.shm import SharedMemoryRegistry
from meshserve.devkit.examples import write_example_repository
from meshserve.errors import InvalidArgument, NotFound, PermissionDenied
from meshserve.tenancy.tenants import TenantsFileError, dev_registry, hash_key, load_tenants
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import Mesh, infer_stub, start_mesh, stop_mesh

SHM = Path("/dev/shm")
RUN = uuid.uuid4().hex[:8]  # keys of this run only: tests may run beside others on the host
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
  - name: plain
    api_keys: ["{hash_key("plain-key")}"]
    models: ["*"]
"""
A = np.array([[1, 2, 3, 4]], np.int64)
B = np.array([[10, 20, 30, 40]], np.int64)


def auth(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {tenant}-key"),)


@pytest.fixture
def objects() -> Iterator[list[Path]]:
    """Shared memory objects a test creates (appended), removed after it."""
    made: list[Path] = []
    yield made
    for path in made:
        path.unlink(missing_ok=True)


def make_object(objects: list[Path], key: str, size: int) -> Path:
    path = SHM / key.lstrip("/")
    path.write_bytes(bytes(size))
    objects.append(path)
    return path


@pytest.fixture
async def mesh(redis_url: str, tmp_path: Path) -> AsyncIterator[Mesh]:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS)
    mesh = await start_mesh(
        redis_url, write_example_repository(tmp_path / "models", ["adder_fixed"]), tenants_path=tenants
    )
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


@pytest.fixture
async def stub(mesh: Mesh) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        yield infer_stub(channel)


def adder_request(a_region: str | None, sum_region: str | None, *, a_offset: int = 0) -> pb.ModelInferRequest:
    """adder_fixed: "a" from ``a_region`` at ``a_offset`` (else raw), "b" raw; "sum" into
    ``sum_region`` at 64 (else in the response), "diff" in the response."""
    request = pb.ModelInferRequest(model_name="adder_fixed")
    a = request.inputs.add(name="a", datatype="INT64", shape=[1, 4])
    if a_region is None:
        request.raw_input_contents.append(A.tobytes())
    else:
        a.parameters["shared_memory_region"].string_param = a_region
        a.parameters["shared_memory_byte_size"].int64_param = A.nbytes
        a.parameters["shared_memory_offset"].int64_param = a_offset
    request.inputs.add(name="b", datatype="INT64", shape=[1, 4])
    request.raw_input_contents.append(B.tobytes())
    out = request.outputs.add(name="sum")
    if sum_region is not None:
        out.parameters["shared_memory_region"].string_param = sum_region
        out.parameters["shared_memory_byte_size"].int64_param = 32
        out.parameters["shared_memory_offset"].int64_param = 64
    request.outputs.add(name="diff")
    return request


async def test_inputs_and_outputs_in_a_region(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, objects: list[Path]
) -> None:
    key = f"{ACME}io"
    path = make_object(objects, key, 256)
    with path.open("r+b") as f:
        f.seek(16 + 8)  # the region starts at 16; "a" at its offset 8
        f.write(A.tobytes())
    register = pb.SystemSharedMemoryRegisterRequest(name="io", key=key, offset=16, byte_size=128)
    await stub.SystemSharedMemoryRegister(register, metadata=auth("acme"), timeout=10)
    status = await stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=auth("acme"))
    assert {n: (r.key, r.offset, r.byte_size) for n, r in status.regions.items()} == {"io": (key, 16, 128)}

    response = await stub.ModelInfer(adder_request("io", "io", a_offset=8), metadata=auth("acme"), timeout=10)
    # "sum" went into the region (no bytes in the response), "diff" came back as usual
    assert [(o.name, list(o.shape)) for o in response.outputs] == [("diff", [1, 4]), ("sum", [1, 4])]
    assert len(response.raw_output_contents) == 1
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.int64), (A - B).ravel())
    written = np.frombuffer(path.read_bytes()[16 + 64 : 16 + 96], np.int64)
    np.testing.assert_array_equal(written, (A + B).ravel())

    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=auth("acme"))
    status = await stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=auth("acme"))
    assert dict(status.regions) == {}
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.ModelInfer(adder_request("io", None), metadata=auth("acme"), timeout=10)
    assert gone.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no shared memory region 'io'" in (gone.value.details() or "")


async def test_regions_are_per_tenant(mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, objects: list[Path]) -> None:
    key = f"{ACME}mine"
    make_object(objects, key, 64)
    register = pb.SystemSharedMemoryRegisterRequest(name="mine", key=key, byte_size=64)
    await stub.SystemSharedMemoryRegister(register, metadata=auth("acme"), timeout=10)

    async def refused(call: object, request: object, tenant: str) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(request, metadata=auth(tenant), timeout=10)  # type: ignore[operator]
        return error.value

    # another tenant neither sees, uses nor maps it, under its name or its key
    status = await refused(stub.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest(name="mine"), "globex")
    assert status.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=auth("globex"))
    assert dict(listed.regions) == {}
    used = await refused(stub.ModelInfer, adder_request("mine", None), "globex")
    assert used.code() == grpc.StatusCode.INVALID_ARGUMENT
    mapped = await refused(stub.SystemSharedMemoryRegister, register, "globex")
    assert mapped.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"does not start with this tenant's key_prefix '{GLOBEX}'" in (mapped.details() or "")
    # a link under its own prefix to acme's object is no way round
    os.symlink(SHM / key.lstrip("/"), SHM / f"{GLOBEX.lstrip('/')}link")
    objects.append(SHM / f"{GLOBEX.lstrip('/')}link")
    linked = pb.SystemSharedMemoryRegisterRequest(name="link", key=f"{GLOBEX}link", byte_size=64)
    assert (await refused(stub.SystemSharedMemoryRegister, linked, "globex")).code() == grpc.StatusCode.INVALID_ARGUMENT
    # unregistering its name leaves acme's region in place
    await stub.SystemSharedMemoryUnregister(
        pb.SystemSharedMemoryUnregisterRequest(name="mine"), metadata=auth("globex")
    )
    await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=auth("globex"))
    mine = await stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="mine"), metadata=auth("acme"))
    assert list(mine.regions) == ["mine"]
    # a tenant without shared_memory in its entry may not register at all
    plain = await refused(stub.SystemSharedMemoryRegister, register, "plain")
    assert plain.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "tenant 'plain' may not use shared memory" in (plain.details() or "")


async def test_offsets_and_sizes_are_checked(
    mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub, objects: list[Path]
) -> None:
    key = f"{ACME}small"
    make_object(objects, key, 64)
    request = pb.SystemSharedMemoryRegisterRequest(name="small", key=key, offset=8, byte_size=64)
    with pytest.raises(grpc.aio.AioRpcError) as too_big:
        await stub.SystemSharedMemoryRegister(request, metadata=auth("acme"), timeout=10)
    assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "need 72 bytes" in (too_big.value.details() or "")
    request = pb.SystemSharedMemoryRegisterRequest(name="small", key=key, byte_size=64)
    await stub.SystemSharedMemoryRegister(request, metadata=auth("acme"), timeout=10)
    for infer in (adder_request("small", None, a_offset=40), adder_request(None, "small")):  # 40 + 32 > 64; 64 + 32
        with pytest.raises(grpc.aio.AioRpcError) as outside:
            await stub.ModelInfer(infer, metadata=auth("acme"), timeout=10)
        assert outside.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "do not lie inside shared memory region 'small' of 64 bytes" in (outside.value.details() or "")
    too_small = adder_request(None, "small")
    too_small.outputs[0].parameters["shared_memory_byte_size"].int64_param = 16
    too_small.outputs[0].parameters["shared_memory_offset"].int64_param = 0
    with pytest.raises(grpc.aio.AioRpcError) as short:
        await stub.ModelInfer(too_small, metadata=auth("acme"), timeout=10)
    assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output 'sum': shared_memory_byte_size 16 is too small for the 32 bytes" in (short.value.details() or "")


async def test_cuda_shared_memory_is_refused_saying_why(mesh: Mesh, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(name="g"), metadata=auth("acme"))
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CUDA shared memory: the gateway holds no GPU" in (refused.value.details() or "")
    metadata = await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
    assert "system_shared_memory" in metadata.extensions


def test_open_development_tenant_maps_any_key(tmp_path: Path) -> None:
    (dev,) = dev_registry().tenants.values()
    (tmp_path / "anything").write_bytes(bytes(8))
    registry = SharedMemoryRegistry(tmp_path)
    registry.register(dev, "r", "/anything", 0, 8)
    assert [r.key for r in registry.status(dev, "")] == ["/anything"]
    with pytest.raises(InvalidArgument, match="is not a POSIX shared memory name"):
        registry.register(dev, "up", "/../etc", 0, 8)
    with pytest.raises(InvalidArgument, match="already registered"):
        registry.register(dev, "r", "/anything", 0, 8)
    registry.unregister(dev, "r")
    with pytest.raises(NotFound):
        registry.status(dev, "r")


def test_hard_links_are_refused(tmp_path: Path) -> None:
    (dev,) = dev_registry().tenants.values()
    (tmp_path / "theirs").write_bytes(bytes(8))
    os.link(tmp_path / "theirs", tmp_path / "mine")
    with pytest.raises(InvalidArgument, match="not a plain shared memory object"):
        SharedMemoryRegistry(tmp_path).register(dev, "r", "/mine", 0, 8)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("shared_memory: {allowed: true}", "'key_prefix' must be '/'"),
        ('shared_memory: {allowed: true, key_prefix: "/"}', "'key_prefix' must be '/'"),
        ("shared_memory: {allowed: yes-please}", "'allowed' must be true or false"),
        ('shared_memory: {allowed: true, key_prefix: "/a", size: 1}', "unknown key 'size'"),
        ('shared_memory: {allowed: true, key_prefix: "/acme"}', "overlaps tenant 'acme''s '/acme-'"),
    ],
)
def test_tenants_file_shared_memory_entry(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(
        f"""tenants:
  - name: acme
    api_keys: ["{hash_key("a")}"]
    models: ["*"]
    shared_memory: {{allowed: true, key_prefix: "/acme-"}}
  - name: other
    api_keys: ["{hash_key("b")}"]
    models: ["*"]
    {entry}
"""
    )
    with pytest.raises(TenantsFileError) as refused:
        load_tenants(path)
    assert message in str(refused.value)


def test_not_allowed_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(
        f'tenants:\n  - {{name: t, api_keys: ["{hash_key("a")}"], models: ["*"], shared_memory: {{allowed: false}}}}\n'
    )
    (tenant,) = load_tenants(path).tenants.values()
    assert tenant.shared_memory_prefix is None
    with pytest.raises(PermissionDenied):
        SharedMemoryRegistry(tmp_path).register(tenant, "r", "/x", 0, 8)


def test_a_reloaded_tenants_file_takes_effect_on_registered_regions(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    entry = 'tenants:\n  - {{name: t, api_keys: ["{}"], models: ["*"], shared_memory: {}}}\n'
    path.write_text(entry.format(hash_key("a"), '{allowed: true, key_prefix: "/t-"}'))
    (tenant,) = load_tenants(path).tenants.values()
    (tmp_path / "t-r").write_bytes(bytes(32))
    registry = SharedMemoryRegistry(tmp_path)
    registry.register(tenant, "r", "/t-r", 0, 32)
    request = adder_request("r", None)
    assert registry.plan(tenant, request, None) is not None
    path.write_text(entry.format(hash_key("a"), "{allowed: false}"))
    (reloaded,) = load_tenants(path).tenants.values()
    with pytest.raises(PermissionDenied, match="may not use shared memory"):
        registry.plan(reloaded, request, None)
