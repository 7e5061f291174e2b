"""The one mesh that every live fuzz test of this package shares."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos import grpc_service_pb2_grpc as pb_grpc
from tests.fuzz.harness import LiveMesh, MeshThread, check_model_table


@pytest.fixture(scope="package")
def live(redis_url: str, model_repository: Path) -> Iterator[LiveMesh]:
    runner = MeshThread()
    mesh = runner.start(redis_url, model_repository)
    try:
        check_model_table(mesh)
        with grpc.insecure_channel(mesh.address) as channel:
            yield LiveMesh(mesh, pb_grpc.GRPCInferenceServiceStub(channel))
    finally:
        runner.stop(mesh)
