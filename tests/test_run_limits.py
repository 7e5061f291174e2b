"""A model's time limits follow its own measured time (model_workers/served.py;
docs/models.md "Timeouts and instances"): the execution timeout's default from the
warm-up, the shedding estimate's decay and cap, the lease and the canary's limit."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from meshserve.devkit.examples import write_example_repository
from meshserve.models.repository import load_model
from meshserve.queue import ModelKeys
from model_workers.served import (
    EXECUTION_TIMEOUT_CAP_MS,
    EXECUTION_TIMEOUT_FLOOR_MS,
    Served,
)


class _Model:
    """What Served reads of a loaded model: its info."""

    def __init__(self, info: Any) -> None:
        self.info = info


def served(tmp_path: Path, warmup_ms: float, **config: Any) -> Served:
    info = dataclasses.replace(load_model(write_example_repository(tmp_path, ["mlp"]) / "mlp", 1), **config)
    return Served(_Model(info), ModelKeys.for_model("mlp", 1), warmup_ms=warmup_ms)  # type: ignore[arg-type]


def test_the_execution_timeout_defaults_to_a_multiple_of_the_warm_up_within_floor_and_cap(tmp_path: Path) -> None:
    assert served(tmp_path, 2.0).execution_timeout_ms() == EXECUTION_TIMEOUT_FLOOR_MS
    assert served(tmp_path, 300.0).execution_timeout_ms() == 30_000
    assert served(tmp_path, 5_000.0).execution_timeout_ms() == EXECUTION_TIMEOUT_CAP_MS
    assert served(tmp_path, 5_000.0, execution_timeout_ms=700).execution_timeout_ms() == 700


def test_one_slow_batch_moves_the_estimate_and_a_few_quick_ones_bring_it_back(tmp_path: Path) -> None:
    model = served(tmp_path, 2.0, execution_timeout_ms=20_000)
    model.observe_compute(32_000.0)  # its first batch, once
    assert model.batch_ms() == 20_000  # capped at the execution timeout: no run lasts longer
    for _ in range(3):
        model.observe_compute(2.0)
    assert 15_000 < model.batch_ms() < 17_000  # the slow batch weighs half after 3 newer ones
    for _ in range(45):  # 15 half-lives
        model.observe_compute(2.0)
    assert model.batch_ms() < 10


def test_lease_and_canary_limits_grow_with_the_model_own_time(tmp_path: Path) -> None:
    quick = served(tmp_path, 2.0)
    quick.observe_compute(1.0)
    assert quick.lease_ms(5_000) == 5_000
    assert quick.canary_timeout_s(5_000) == 5.0

    slow = served(tmp_path, 8_000.0)  # a model that always takes about 7.5 s
    slow.observe_compute(7_500.0)
    assert slow.lease_ms(5_000) == 22_500
    assert slow.canary_timeout_s(5_000) == 32.0  # 4 x its warm-up, not the 5 s floor
    capped = served(tmp_path, 8_000.0, execution_timeout_ms=12_000)
    assert capped.canary_timeout_s(5_000) == 12.0  # never past the execution timeout
