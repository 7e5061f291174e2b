"""The settings of one ``meshserve bench`` run, built once from its flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SCENARIOS = (
    "sweep",
    "open-loop",
    "overload",
    "noisy-neighbor",
    "retry-storm",
    "large",
    "rollout",
    "many-models",
    "stream",
    "sequences",
    "scale-out",
    "scaling",
)

SCALING_AXES = ("batch", "concurrency", "payload", "tenants", "models")
"""The scaling scenario's axes (``--axis``), in the order it sweeps them."""


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Every scenario reads the fields it needs; the rest ride along into ``--json``."""

    scenario: str  # one of SCENARIOS
    target: str | None  # HOST:PORT of a running mesh; None: the bench starts one
    model: str
    repository: Path
    duration_s: float
    warmup_s: float
    json_path: Path | None = None
    redis_url: str | None = None  # the mesh's Redis, to read what each call cost it; None: not read
    # sweep
    concurrencies: tuple[int, ...] = (1, 32)
    channels: int | None = None  # None: min(concurrency, MAX_DEFAULT_CHANNELS)
    max_batch: int | None = None  # the raw run's largest batch; None: the model's max_batch_size
    # open-loop and overload
    rates_per_s: tuple[float, ...] = (50.0, 100.0, 200.0)
    request_timeout_s: float = 2.0  # each open-loop call's gRPC timeout; overload's deadline
    # noisy-neighbor and retry-storm
    steady_rate_per_s: float = 50.0  # what tenant B sends (retry-storm's default: 40)
    noisy_limit_per_s: float = 40.0  # tenant A's rate limit (and burst)
    flood_rate_per_s: float = 400.0  # what tenant A sends
    flood_channels: int = 8
    # large
    sizes_mib: tuple[float, ...] = (1.0, 16.0, 64.0)  # one request of each size, MiB
    # retry-storm: A retries from this many connections, pausing after each refusal
    storm_connections: int = 48
    storm_pause_ms: float = 20.0
    # scaling: the axes swept, one at a time (SCALING_AXES)
    axes: tuple[str, ...] = SCALING_AXES
    scaling_rate_per_s: float | None = None  # tenants and models: open loop at this rate; None: closed loop
