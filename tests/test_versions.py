"""Versions behind one model name: the version policy, the latest ready version,
pinned versions, traffic splits (weights, sticky_by, run-time overrides) and
shadow traffic, on the real in-process mesh (version N answers x + N)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from gateway.routing import RoutingView
from gateway.versions import VersionChooser, choices_for, sticky_point
from meshserve.devkit.versioned import write_versioned_model
from meshserve.models.repository import RepositoryError, load_model, scan_repository
from meshserve.models.traffic import TrafficSplit
from meshserve.tenancy.tenants import hash_key
from protos import grpc_service_pb2 as pb
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc
from tests.support import infer_request, infer_stub, output_arrays, start_mesh, stop_mesh

MODEL = "offset"
X = np.arange(4, dtype=np.float32).reshape(1, 4)


def request(version: str = "", **params: str) -> pb.ModelInferRequest:
    message = infer_request(MODEL, {"x": X}, version=version)
    for key, value in params.items():
        message.parameters[key].string_param = value
    return message


async def answered_by(stub: Any, message: pb.ModelInferRequest, metadata: Any = None) -> int:
    """The version that answered, checked against what it computed (x + version)."""
    response = await stub.ModelInfer(message, metadata=metadata, timeout=10)
    version = int(response.model_version)
    np.testing.assert_array_equal(output_arrays(response)["y"], X + version)
    return version


# ------------------------------------------------------------ the version policy


def test_latest_policy_serves_only_the_highest_versions(tmp_path: Path) -> None:
    write_versioned_model(tmp_path, MODEL, [1, 2, 3], "version_policy: {latest: 2}\n")
    models, problems = scan_repository(tmp_path)
    assert problems == []
    assert [m.version for m in models] == [2, 3]
    with pytest.raises(RepositoryError, match="outside 'version_policy'"):
        load_model(tmp_path / MODEL, 1)


def test_specific_and_all_policies(tmp_path: Path) -> None:
    write_versioned_model(tmp_path, MODEL, [1, 2, 3], "version_policy: {specific: [1, 3]}\n")
    assert [m.version for m in scan_repository(tmp_path)[0]] == [1, 3]
    (tmp_path / MODEL / "config.yaml").write_text("version_policy: {all: {}}\n")
    assert [m.version for m in scan_repository(tmp_path)[0]] == [1, 2, 3]
    (tmp_path / MODEL / "config.yaml").unlink()
    assert [m.version for m in scan_repository(tmp_path)[0]] == [1, 2, 3]  # meshserve's default: all


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("version_policy: {latest: 0}\n", "'version_policy.latest' must be an integer >= 1"),
        ("version_policy: {newest: 1}\n", "'version_policy' must be one of"),
        ("traffic: {weights: {1: -1}}\n", "weight of version 1 must be an integer >= 0"),
        ("traffic: {weights: {1: 0}}\n", "the weights sum to 0"),
        ("traffic: {wieghts: {1: 1}}\n", "unknown key 'traffic.wieghts'"),
        ("traffic: {shadow: {version: 2, share: 2}}\n", "'traffic.shadow.share' must be a number from 0 to 1"),
        ("versions: [1]\nversion_policy: {latest: 1}\n", "keep one"),
    ],
)
def test_bad_policy_or_traffic_names_the_key(tmp_path: Path, config: str, message: str) -> None:
    write_versioned_model(tmp_path, MODEL, [1, 2], config)
    _, problems = scan_repository(tmp_path)
    assert len(problems) == 1
    assert message in problems[0]
    assert "config.yaml" in problems[0]


def test_traffic_section_rides_on_every_version(tmp_path: Path) -> None:
    write_versioned_model(
        tmp_path, MODEL, [1, 2], "traffic:\n  weights: {1: 95, 2: 5}\n  sticky_by: user\n  shadow: {version: 2}\n"
    )
    models, _ = scan_repository(tmp_path)
    expected = TrafficSplit(MODEL, ((1, 95), (2, 5)), "user", 2, 0.1)
    assert [m.traffic for m in models] == [expected, expected]


# ------------------------------------------------------------ choosing a version (no mesh)


def view(ready: set[int], split: TrafficSplit | None = None, versions: tuple[int, ...] = (1, 2, 3)) -> RoutingView:
    models: dict[tuple[str, int], Any] = {(MODEL, v): object() for v in versions}
    return RoutingView(
        1,
        models,
        frozenset((MODEL, v) for v in ready),
        {MODEL: max(versions)},
        splits={MODEL: split} if split else {},
    )


def test_no_split_picks_the_latest_ready_version() -> None:
    assert choices_for(view({1, 2}))[MODEL].default == 2
    assert choices_for(view(set()))[MODEL].default == 3  # none ready: the latest, refused as not ready


def test_a_not_ready_versions_weight_goes_to_the_others() -> None:
    split = TrafficSplit(MODEL, ((1, 50), (2, 25), (3, 25)))
    choice = choices_for(view({1, 2}, split))[MODEL]
    assert choice.versions == (1, 2)
    assert choice.cumulative == pytest.approx((2 / 3, 1.0))
    fallback = choices_for(view({2}, TrafficSplit(MODEL, ((1, 1), (3, 1)))))[MODEL]
    assert fallback.versions == ()
    assert fallback.default == 2


def test_draws_map_onto_the_cumulative_weights() -> None:
    draws = iter([0.0, 0.59, 0.61, 0.999])
    chooser = VersionChooser(lambda: view({1, 2, 3}, TrafficSplit(MODEL, ((1, 60), (3, 40)))), lambda: next(draws))
    assert [chooser.choose(MODEL, _call()) for _ in range(4)] == [1, 1, 3, 3]
    assert chooser.choose(MODEL, None) == 3  # metadata calls: the default
    assert chooser.choose("other", _call()) is None


def test_sticky_point_is_stable_and_spread() -> None:
    assert sticky_point("user-7") == sticky_point("user-7")
    points = [sticky_point(f"user-{i}") for i in range(1000)]
    assert all(0 <= p < 1 for p in points)
    assert 400 < sum(p < 0.5 for p in points) < 600


def _call(**params: str) -> Any:
    from gateway.request import infer_call

    return infer_call(request(**params))


# ------------------------------------------------------------ on the mesh


@pytest.fixture
async def versioned(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """The model's two versions, with config.yaml from an indirect parameter (if any)."""
    write_versioned_model(tmp_path, MODEL, [1, 2], getattr(request, "param", ""))
    return tmp_path


@pytest.fixture
async def mesh(redis: Any, redis_url: str, versioned: Path) -> AsyncIterator[Any]:
    started = await start_mesh(redis_url, versioned, until=RoutingView.settled)
    try:
        yield started
    finally:
        await stop_mesh(started)


@pytest.fixture
async def stub(mesh: Any) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        yield infer_stub(channel)


@pytest.fixture
async def router(mesh: Any) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(mesh.router.address) as channel:
        yield mpb_grpc.RouterStub(channel)


async def test_latest_version_by_default_and_a_pinned_version_exactly(stub: Any) -> None:
    assert {await answered_by(stub, request()) for _ in range(5)} == {2}
    assert {await answered_by(stub, request("1")) for _ in range(5)} == {1}


async def test_a_version_that_failed_to_load_leaves_the_old_one_serving(redis_url: str, tmp_path: Path) -> None:
    write_versioned_model(tmp_path, MODEL, [1, 2])
    (tmp_path / MODEL / "2" / "model.onnx").write_bytes(b"not a model")
    mesh = await start_mesh(redis_url, tmp_path, until=RoutingView.settled)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            assert {await answered_by(stub, request()) for _ in range(5)} == {1}
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ModelInfer(request("2"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "version 2 is not ready" in caught.value.details()
    finally:
        await stop_mesh(mesh)


@pytest.mark.parametrize("versioned", ["traffic: {weights: {1: 80, 2: 20}}\n"], indirect=True)
async def test_split_proportions_over_400_calls(stub: Any, mesh: Any) -> None:
    """Binomial(400, 0.2): standard deviation 8 calls; the bound is 4 of them."""
    versions = Counter(await asyncio.gather(*(answered_by(stub, request()) for _ in range(400))))
    assert set(versions) == {1, 2}
    assert abs(versions[2] - 80) <= 32, versions
    samples = mesh.gateway.metrics.registry.get_sample_value
    assert samples("meshserve_version_requests_total", {"model": MODEL, "version": "2"}) == versions[2]


@pytest.mark.parametrize("versioned", ["traffic: {weights: {1: 50, 2: 50}, sticky_by: user}\n"], indirect=True)
async def test_sticky_by_a_parameter_or_header_keeps_one_version_per_caller(stub: Any) -> None:
    seen: dict[str, set[int]] = {}
    for user in range(24):
        for _ in range(6):
            seen.setdefault(f"u{user}", set()).add(await answered_by(stub, request(user=f"u{user}")))
    assert all(len(versions) == 1 for versions in seen.values()), seen
    assert {v for versions in seen.values() for v in versions} == {1, 2}  # 2**-23 to fail by chance
    by_header = {await answered_by(stub, request(), metadata=(("user", "u3"),)) for _ in range(6)}
    assert by_header == seen["u3"]  # a header carries the same value to the same version


async def test_set_traffic_split_applies_at_the_next_table_and_is_validated(stub: Any, router: Any, mesh: Any) -> None:
    before = mesh.gateway.routing.view.generation
    answer = await router.SetTrafficSplit(mpb.TrafficSplit(model=MODEL, weights={1: 1, 2: 0}), timeout=5)
    assert dict(answer.weights) == {1: 1, 2: 0}
    view = await mesh.gateway.routing.wait_for(lambda v: v.generation > before)
    assert MODEL in view.splits
    assert {await answered_by(stub, request()) for _ in range(10)} == {1}

    for weights, detail in [
        ({3: 1}, "has no version 3"),
        ({1: 0, 2: 0}, "the weights sum to 0"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await router.SetTrafficSplit(mpb.TrafficSplit(model=MODEL, weights=weights), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert detail in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.SetTrafficSplit(mpb.TrafficSplit(model="nope", weights={1: 1}), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    before = mesh.gateway.routing.view.generation
    answer = await router.SetTrafficSplit(mpb.TrafficSplit(model=MODEL), timeout=5)  # back to config: none
    assert not answer.weights
    await mesh.gateway.routing.wait_for(lambda v: v.generation > before and MODEL not in v.splits)
    assert {await answered_by(stub, request()) for _ in range(10)} == {2}


@pytest.mark.parametrize("versioned", ["traffic: {weights: {1: 1}, shadow: {version: 2, share: 1.0}}\n"], indirect=True)
async def test_shadow_copies_are_compared_never_returned(stub: Any, mesh: Any) -> None:
    assert {await answered_by(stub, request()) for _ in range(12)} == {1}
    counts = mesh.gateway.gateway.shadow_counts
    async with asyncio.timeout(10):
        while counts.total(MODEL, 2) < 12:
            counts.changed.clear()
            await counts.changed.wait()
    samples = mesh.gateway.metrics.registry.get_sample_value
    # x + 1 against x + 2: the argmax agrees on every row, the difference is 1
    assert samples("meshserve_shadow_comparisons_total", {"model": MODEL, "version": "2", "outcome": "agree"}) == 12
    assert samples("meshserve_shadow_max_abs_diff", {"model": MODEL, "version": "2"}) == 1.0
    assert samples("meshserve_version_requests_total", {"model": MODEL, "version": "2"}) is None
    assert {await answered_by(stub, request("2")) for _ in range(3)} == {2}  # pinned: no shadow
    assert counts.total(MODEL, 2) == 12


async def test_cli_split_sets_shows_and_resets(mesh: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from meshserve.cli.main import main

    command = ["models", "--address", mesh.address, "split", MODEL]  # through the gateway, as an admin
    args = [*command, "1=1", "2=3", "--sticky-by", "user", "--shadow", "2:0.25"]
    assert await asyncio.to_thread(main, args) == 0
    assert capsys.readouterr().out == f"{MODEL}: v1 1 (25%), v2 3 (75%); sticky by user; shadow 25% to v2\n"
    split = (await mesh.gateway.routing.wait_for(lambda v: MODEL in v.splits)).splits[MODEL]
    assert split == TrafficSplit(MODEL, ((1, 1), (2, 3)), "user", 2, 0.25)

    assert await asyncio.to_thread(main, [*command, "3=1"]) == 1
    assert "INVALID_ARGUMENT: weights: model 'offset' has no version 3" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*command, "2=x"]) == 2
    assert "expected VERSION=WEIGHT" in capsys.readouterr().err

    assert await asyncio.to_thread(main, command) == 0
    assert "no split" in capsys.readouterr().out
    await mesh.gateway.routing.wait_for(lambda v: MODEL not in v.splits)


async def test_a_cached_split_model_answers_each_version_with_its_own_result(redis_url: str, tmp_path: Path) -> None:
    """The response cache and a 50/50 split: the cache's probe and the call draw their
    version apart, and a v2 answer once went into v1's entry (a later hit: v1 with v2's
    result). Every answer must be the computation of the version it names."""
    write_versioned_model(tmp_path, MODEL, [1, 2], "response_cache: true\ntraffic:\n  weights: {1: 50, 2: 50}\n")
    mesh = await start_mesh(redis_url, tmp_path)
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = infer_stub(channel)
            answered = []
            for _ in range(40):  # the same input every time: each call probes the same two entries
                answered.append(await answered_by(stub, request()))  # checks x + version
                await mesh.gateway.cache.settle()
    finally:
        await stop_mesh(mesh)
    assert set(answered) == {1, 2}


async def test_only_an_admin_tenant_changes_a_split_through_the_gateway(redis_url: str, tmp_path: Path) -> None:
    """The split is the gateway's Admin service, behind the tenant's key: the router's
    own port stays internal, and a tenant that may merely call the model may not move
    everyone's traffic."""
    write_versioned_model(tmp_path / "repo", MODEL, [1, 2])
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        "tenants:\n"
        f'  - {{name: ops, api_keys: ["{hash_key("ops-key")}"], models: ["*"], admin: true}}\n'
        f'  - {{name: user, api_keys: ["{hash_key("user-key")}"], models: ["*"]}}\n'
    )
    mesh = await start_mesh(redis_url, tmp_path / "repo", tenants_path=tenants)
    split = mpb.TrafficSplit(model=MODEL, weights={1: 0, 2: 1})
    try:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            admin = mpb_grpc.AdminStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await admin.SetTrafficSplit(split, metadata=(("authorization", "Bearer user-key"),), timeout=10)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "admin: true" in (denied.value.details() or "")
            assert MODEL not in mesh.gateway.routing.view.splits
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await admin.SetTrafficSplit(split, timeout=10)
            assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = await admin.SetTrafficSplit(split, metadata=(("authorization", "Bearer ops-key"),), timeout=10)
            assert dict(answer.weights) == {1: 0, 2: 1}
            # in force here once the call returns: the next call follows it
            stub = infer_stub(channel)
            metadata = (("authorization", "Bearer user-key"),)
            assert {await answered_by(stub, request(), metadata) for _ in range(5)} == {2}
    finally:
        await stop_mesh(mesh)
