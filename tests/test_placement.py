"""Placement by device memory: the pure best-fit, the router applying it, and the
figures workers measure. No GPU here: the inventory is plain values."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest

from meshserve.models.repository import ModelInfo, PlacementConfig, load_model
from meshserve.observe.metrics import RouterMetrics, RouterReads
from meshserve.platform.inventory import Device
from model_workers.memory import HostPeakRss, UnmeasuredGpu, describe_device, warm_up_measured
from model_workers.session import LoadedModel
from router.core import RouterCore
from router.placement import (
    Demand,
    Footprint,
    Placement,
    Slot,
    Unplaceable,
    allows,
    estimate_bytes,
    place,
)

GIB = 2**30


def _slot(device: Device) -> Slot:
    """An inventory device as placement sees it (what a worker's report carries)."""
    return Slot(device.id, device.kind, device.profile, device.memory_bytes)


def _inventory() -> list[Device]:
    """GPU 0 split into MIG slices of mixed sizes, GPU 1 whole, and the CPU."""
    h100 = "NVIDIA H100 80GB HBM3"
    return [
        Device("MIG-a", "mig", h100, "MIG-a", 0, "3g.40gb", 40 * GIB),
        Device("MIG-b", "mig", h100, "MIG-b", 0, "2g.20gb", 20 * GIB),
        Device("MIG-c", "mig", h100, "MIG-c", 0, "1g.10gb", 10 * GIB),
        Device("MIG-d", "mig", h100, "MIG-d", 0, "1g.10gb", 10 * GIB),
        Device("cuda:1", "gpu", h100, "GPU-1", 1, "", 80 * GIB),
        Device("cpu", "cpu", "Xeon", "", -1, "", 64 * GIB),
    ]


def _demand(name: str, gib: float, device: str = "any", min_mig_profile: str | None = None) -> Demand:
    return Demand((name, 1), int(gib * GIB), device, min_mig_profile)


# With 10% headroom: MIG-a 36, MIG-b 18, MIG-c and MIG-d 9, cuda:1 72, cpu 57.6 GiB usable.
DOZEN = [
    _demand("huge", 100, "gpu"),  # bigger than any GPU
    _demand("llm", 70, "gpu"),  # only the whole GPU
    _demand("bigcpu", 60, "cpu"),  # under the CPU's 64 GiB, over its 57.6 after headroom
    _demand("vision", 30, "gpu", "3g.40gb"),
    _demand("tabular", 20, "cpu"),
    _demand("asr", 16, "any", "2g.20gb"),
    _demand("translate", 12),  # no accelerator left with 12 GiB: the CPU
    _demand("embed", 8, "gpu", "2g.20gb"),  # the 1g.10gb slices have room but are too small
    _demand("ocr", 8),
    _demand("rerank", 8),
    _demand("tokenizer", 2, "cpu"),
    _demand("small", 1),
]


def _placed(placement: Placement) -> dict[str, list[str]]:
    return {device: [name for name, _ in keys] for device, keys in placement.assignments}


def test_a_dozen_models_on_two_gpus_with_mig_slices_and_the_cpu() -> None:
    placement = place([_slot(d) for d in _inventory()], DOZEN, headroom_ratio=0.1)

    assert _placed(placement) == {
        "MIG-a": ["vision"],
        "MIG-b": ["asr"],
        "MIG-c": ["ocr", "small"],  # ties between the two 1g.10gb slices go to the lower id
        "MIG-d": ["rerank"],
        "cpu": ["tabular", "tokenizer", "translate"],
        "cuda:1": ["llm"],
    }
    assert [entry.key[0] for entry in placement.unplaceable] == ["bigcpu", "embed", "huge"]


def test_the_cpu_takes_only_what_its_config_allows_and_what_fits() -> None:
    placement = place([_slot(d) for d in _inventory()], DOZEN, headroom_ratio=0.1)
    by_name = {d.key[0]: d for d in DOZEN}

    on_cpu = [by_name[name] for name, _ in placement.on("cpu")]
    assert {d.device for d in on_cpu} <= {"cpu", "any"}
    assert sum(d.estimate_bytes for d in on_cpu) <= 0.9 * 64 * GIB
    # A GPU-only model stays unplaced although the CPU has room for it.
    assert ("embed", 1) in placement.unplaceable_keys()
    # An "any" model goes to the CPU only when no accelerator fits it.
    assert ("translate", 1) in placement.on("cpu")
    assert ("small", 1) not in placement.on("cpu")


def test_min_mig_profile_keeps_models_off_smaller_slices() -> None:
    placement = place([_slot(d) for d in _inventory()], DOZEN, headroom_ratio=0.1)
    profiles = {d.id: d.profile for d in _inventory()}

    for device_id, keys in placement.assignments:
        for name, _ in keys:
            if name in ("vision", "asr"):
                assert device_id == "cuda:1" or profiles[device_id] in ("3g.40gb", "2g.20gb")
    mig = Slot("MIG-x", "mig", "1g.10gb", 10 * GIB)
    assert not allows(mig, _demand("embed", 1, "gpu", "2g.20gb"))
    assert allows(Slot("MIG-y", "mig", "2g.20gb", 20 * GIB), _demand("embed", 1, "gpu", "2g.20gb"))
    assert not allows(Slot("MIG-y", "mig", "3g.20gb", 20 * GIB), _demand("m", 1, "gpu", "2g.40gb"))  # memory
    assert not allows(Slot("MIG-y", "mig", "1g.40gb", 40 * GIB), _demand("m", 1, "gpu", "2g.20gb"))  # compute
    assert allows(Slot("cuda:0", "gpu", "", 10 * GIB), _demand("m", 1, "gpu", "7g.80gb"))  # whole GPUs always
    assert not allows(Slot("MIG-z", "mig", "", 0), _demand("m", 1, "gpu", "1g.10gb"))  # unknown profile


def test_unplaceable_models_carry_the_numbers() -> None:
    placement = place([_slot(d) for d in _inventory()], DOZEN, headroom_ratio=0.1)
    by_name = {entry.key[0]: entry for entry in placement.unplaceable}

    huge = by_name["huge"]
    assert huge == Unplaceable(("huge", 1), 100 * GIB, "device: gpu", 5, int(80 * GIB * 0.9))
    assert huge.message() == (
        "model huge version 1 needs 100.00 GiB (107374182400 bytes) (device: gpu); the most free memory"
        " on the 5 allowed device(s) is 72.00 GiB (77309411328 bytes) after headroom"
    )
    embed = by_name["embed"]
    assert (embed.constraint, embed.allowed_devices) == ("device: gpu, min_mig_profile: 2g.20gb", 3)
    assert embed.largest_free_bytes == int(40 * GIB * 0.9) - 30 * GIB  # what vision left on MIG-a
    nowhere = place([Slot("cpu", "cpu", memory_bytes=64 * GIB)], [_demand("llm", 1, "gpu")]).unplaceable
    assert (
        nowhere[0].message()
        == "model llm version 1 needs 1.00 GiB (1073741824 bytes) (device: gpu), and no live device allows it"
    )


def test_same_input_same_placement_whatever_the_order() -> None:
    slots = [_slot(d) for d in _inventory()]
    first = place(slots, DOZEN, headroom_ratio=0.1)
    shuffler = random.Random(7)
    for _ in range(5):
        shuffled_slots, shuffled_demands = slots[:], DOZEN[:]
        shuffler.shuffle(shuffled_slots)
        shuffler.shuffle(shuffled_demands)
        assert place(shuffled_slots, shuffled_demands, headroom_ratio=0.1) == first


def test_headroom_is_kept_free_on_every_device() -> None:
    slot = Slot("cuda:0", "gpu", memory_bytes=10 * GIB)
    model = _demand("m", 9.5, "gpu")
    assert place([slot], [model], headroom_ratio=0.0).on("cuda:0") == (("m", 1),)
    assert place([slot], [model], headroom_ratio=0.1).unplaceable_keys() == {("m", 1)}
    three = [_demand("a", 3.5, "gpu"), _demand("b", 3.5, "gpu"), _demand("c", 3.5, "gpu")]  # 9 GiB usable
    assert [entry.key for entry in place([slot], three, headroom_ratio=0.1).unplaceable] == [("c", 1)]
    with pytest.raises(ValueError, match="headroom_ratio"):
        place([slot], [model], headroom_ratio=1.0)


def test_unknown_memory_fits_anything_and_is_chosen_last() -> None:
    known = Slot("cuda:0", "gpu", memory_bytes=10 * GIB)
    unknown = Slot("cuda:1", "gpu")
    placement = place([known, unknown], [_demand("big", 500, "gpu"), _demand("small", 1, "gpu")])
    assert placement.on("cuda:0") == (("small", 1),)
    assert placement.on("cuda:1") == (("big", 1),)


def _info(name: str, *, weights_gib: float = 0, memory_gib: float | None = None, **placement: Any) -> ModelInfo:
    """A model version known only by its placement figures (never loaded here)."""
    return ModelInfo(
        name=name,
        version=1,
        path=Path(f"/models/{name}/1/model.onnx"),
        inputs=(),
        outputs=(),
        max_batch_size=0,
        max_queue_delay_us=0,
        preferred_batch_sizes=(),
        max_queue_size=0,
        placement=PlacementConfig(memory_bytes=None if memory_gib is None else int(memory_gib * GIB), **placement),
        weights_bytes=int(weights_gib * GIB),
    )


def test_estimate_is_the_override_else_measured_else_twice_the_weights() -> None:
    assert estimate_bytes(_info("m", weights_gib=1), None) == 2 * GIB
    assert estimate_bytes(_info("m", weights_gib=1), Footprint(3 * GIB, 0)) == 6 * GIB  # reported weights, unmeasured
    assert estimate_bytes(_info("m", weights_gib=1), Footprint(GIB, GIB // 2)) == GIB + GIB // 2
    assert estimate_bytes(_info("m", weights_gib=1, memory_gib=5), Footprint(GIB, GIB)) == 5 * GIB


async def test_each_worker_is_told_to_hold_the_models_placed_on_its_device(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    models = [
        _info("detector", memory_gib=4, device="gpu"),
        _info("features", memory_gib=1, device="cpu"),
        _info("ranker", memory_gib=2),  # any: the GPU first
        _info("giant", memory_gib=40, device="gpu"),  # fits nowhere
    ]
    core = RouterCore(models, clock=lambda: now[0], headroom_ratio=0.1)
    cpu, gpu = Slot("cpu", "cpu", memory_bytes=8 * GIB), Slot("cuda:0", "gpu", memory_bytes=16 * GIB)

    with caplog.at_level(logging.WARNING, logger="router.core"):
        on_gpu = await core.report("w-gpu", "cuda:0", {("giant", 1)}, draining=False, slot=gpu)
        on_cpu = await core.report("w-cpu", "cpu", set(), draining=False, slot=cpu)
        on_gpu_twin = await core.report("w-gpu-2", "cuda:0", set(), draining=False, slot=gpu)

    assert [m.name for m in on_gpu] == ["detector", "ranker"]
    assert [m.name for m in on_gpu_twin] == ["detector", "ranker"]  # a shared device: both hold its models
    assert [m.name for m in on_cpu] == ["features"]
    assert core.unplaceable() == {
        ("detector", 1): False,
        ("features", 1): False,
        ("ranker", 1): False,
        ("giant", 1): True,
    }
    assert ("giant", 1) not in core.snapshot().ready  # even though a worker says it holds it
    giant_warnings = [r.getMessage() for r in caplog.records if "giant" in r.getMessage()]
    free = int(16 * GIB * 0.9)  # giant is placed first, before anything took room on the GPU
    assert giant_warnings == [
        "unplaceable: model giant version 1 needs 40.00 GiB (42949672960 bytes) (device: gpu); the most free"
        f" memory on the 1 allowed device(s) is 14.40 GiB ({free} bytes) after headroom"
    ]  # once: the CPU joining changed the placement, not giant's numbers

    metrics = RouterMetrics.create(
        RouterReads(
            ready=lambda: {key: False for key in core.models}, depths=dict, loads=dict, unplaceable=core.unplaceable
        )
    )
    assert metrics.registry.get_sample_value("meshserve_model_unplaceable", {"model": "giant", "version": "1"}) == 1
    assert metrics.registry.get_sample_value("meshserve_model_unplaceable", {"model": "ranker", "version": "1"}) == 0

    now[0] += 10.0  # the GPU workers go silent; the CPU worker keeps reporting
    await core.report("w-cpu", "cpu", set(), draining=False, slot=cpu)
    await core.forget_silent_workers()
    assert [m.name for m in await core.report("w-cpu", "cpu", set(), draining=False, slot=cpu)] == [
        "features",
        "ranker",
    ]


async def test_one_cpu_worker_that_does_not_describe_its_device_gets_every_model() -> None:
    core = RouterCore([_info("a", weights_gib=1), _info("b", weights_gib=2), _info("c", weights_gib=1, device="cpu")])
    assert [m.name for m in await core.report("w", "cpu", set(), draining=False)] == ["a", "b", "c"]


def test_slots_come_from_the_inventory_and_the_worker_describes_its_device() -> None:
    inventory = _inventory()
    assert describe_device("MIG-b", inventory).memory_bytes == 20 * GIB
    assert describe_device("cpu").memory_bytes > 0
    unknown = describe_device("cuda:7", inventory)
    assert (unknown.kind, unknown.memory_bytes) == ("gpu", 0)


def test_warm_up_measures_a_real_model(model_repository: Path) -> None:
    model = LoadedModel(load_model(model_repository / "cnn", 1))
    _, activation_bytes = warm_up_measured(model, HostPeakRss())
    assert model.ready
    assert activation_bytes > 0
    assert model.info.weights_bytes == (model_repository / "cnn" / "1" / "model.onnx").stat().st_size
    gpu = LoadedModel(load_model(model_repository / "mlp", 1))
    assert warm_up_measured(gpu, UnmeasuredGpu())[1] == 0  # TODO(#6): not measured on a GPU yet


async def test_the_worker_reports_weights_and_activations_to_the_router(mesh: Any) -> None:
    core: RouterCore = mesh.router.core
    for key in core.models:
        footprint = core.footprints[key]
        assert footprint.weights_bytes > 0
        assert footprint.activation_bytes > 0
    assert set(core.placement.on("cpu")) == set(core.models)
    assert not any(core.unplaceable().values())
