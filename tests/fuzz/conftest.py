"""The one mesh that every live fuzz test of this package shares."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from meshserve.devkit.examples import write_example_repository
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.dtype_models import LOWERCASE, build_lowercase, write_model
from tests.fuzz.harness import LiveMesh, MeshThread, check_model_table


@pytest.fixture(scope="package")
def fuzz_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example models and a string model (none of the examples takes BYTES)."""
    root = write_example_repository(tmp_path_factory.mktemp("fuzz-models"))
    write_model(root, LOWERCASE, build_lowercase())
    return root


@pytest.fixture(scope="package")
def live(redis_url: str, fuzz_repository: Path) -> Iterator[LiveMesh]:
    runner = MeshThread()
    mesh = runner.start(redis_url, fuzz_repository)
    try:
        check_model_table(mesh)
        with grpc.insecure_channel(mesh.address) as channel:
            yield LiveMesh(mesh, pb_grpc.GRPCInferenceServiceStub(channel))
    finally:
        runner.stop(mesh)
