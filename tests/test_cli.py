"""The meshserve command's small pieces that need no server."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import io
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from meshserve.cli.main import build_parser, main, serve_until_signal
from meshserve.cli.supervisor import UP_GATEWAY_OWN, ChildSpec, plan_children
from meshserve.platform.inventory import cpu_device
from meshserve.settings import (
    ENV_PREFIX,
    GatewaySettings,
    LogSettings,
    Option,
    RouterSettings,
    WorkerSettings,
    from_args,
    options,
)
from meshserve.tenancy.tenants import TenantRegistry, load_tenants

SERVICES: dict[str, Any] = {"router": RouterSettings, "gateway": GatewaySettings, "worker": WorkerSettings}
REQUIRED = {
    "router": {"model_repository": Path("/m")},
    "gateway": {"redis_url": "redis://r:6379/0"},
    "worker": {"redis_url": "redis://r:6379/0", "model_repository": Path("/m")},
}


@pytest.fixture
def no_meshserve_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def required_argv(role: str, but: str = "") -> list[str]:
    """The flags ``role`` needs, but the field ``but`` (set another way by the test)."""
    flags = {"model_repository": "--model-repository", "redis_url": "--redis-url"}
    return [arg for name, value in REQUIRED[role].items() if name != but for arg in (flags[name], str(value))]


def other_value(option: Option) -> str:
    """A value for ``option`` unlike its default, as a flag or a variable spells it."""
    if option.choices is not None:
        return next(c for c in reversed(option.choices) if c != option.default)
    if option.convert is int:
        return str(option.default + 7)
    if option.convert is float:
        return str(option.default + 0.5)
    if option.convert is Path:
        return "/elsewhere"
    return "elsewhere.example:1234"


def test_hash_key_prints_what_the_tenants_file_accepts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert main(["hash-key", "-"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("sha256:")
    path = tmp_path / "tenants.yaml"
    path.write_text(f'tenants:\n  - name: a\n    api_keys: ["{line}"]\n    models: ["*"]\n')
    registry: TenantRegistry = load_tenants(path)
    assert registry.authenticate("s3cret") is not None
    assert registry.authenticate("s3cret\n") is None


def test_flags_default_to_meshserve_variables_and_win_over_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHSERVE_GRPC_PORT", "9101")
    monkeypatch.setenv("MESHSERVE_LEASE_MS", "750")
    parser = build_parser()
    gateway = parser.parse_args(["gateway"])
    worker = parser.parse_args(["worker", "--model-repository", "/m", "--lease-ms", "900"])
    assert gateway.grpc_port == 9101
    assert parser.parse_args(["worker", "--model-repository", "/m"]).lease_ms == 750
    assert worker.lease_ms == 900  # the flag wins over the variable


@pytest.mark.usefixtures("no_meshserve_variables")
@pytest.mark.parametrize("role", SERVICES)
def test_each_flag_defaults_to_its_settings_field(role: str) -> None:
    cls = SERVICES[role]
    args = build_parser().parse_args([role, *required_argv(role)])
    assert from_args(cls, args) == cls(**REQUIRED[role])
    for option in options(cls).values():
        if option.flag is not None and option.has_default:
            assert getattr(args, option.dest) == option.default, option.flag


@pytest.mark.usefixtures("no_meshserve_variables")
def test_up_defaults_to_the_gateway_settings_it_shares() -> None:
    args = build_parser().parse_args(["up"])
    for name in UP_GATEWAY_OWN:
        option = options(GatewaySettings)[name]
        assert getattr(args, option.dest) == option.default, option.flag
    assert (args.log_level, args.log_format) == (LogSettings().log_level, LogSettings().log_format)


@pytest.mark.usefixtures("no_meshserve_variables")
@pytest.mark.parametrize("role", SERVICES)
def test_a_variable_and_its_flag_set_the_same_field(role: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = SERVICES[role]
    default = cls(**REQUIRED[role])
    for option in options(cls).values():
        if option.flag is None or option.env is None:
            continue
        others = required_argv(role, but=option.name)
        if option.is_bool:
            by_flag = build_parser().parse_args([role, *others, option.flag])
            monkeypatch.setenv(ENV_PREFIX + option.env, "true")
        else:
            value = other_value(option)
            by_flag = build_parser().parse_args([role, *others, option.flag, value])
            monkeypatch.setenv(ENV_PREFIX + option.env, value)
        by_variable = build_parser().parse_args([role, *others])
        monkeypatch.delenv(ENV_PREFIX + option.env)
        from_flag, from_variable = from_args(cls, by_flag), from_args(cls, by_variable)
        assert from_flag == from_variable, option.flag
        assert getattr(from_flag, option.name) != getattr(default, option.name), option.flag


def test_a_variable_without_a_flag_reaches_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHSERVE_TRACE_TENANT_SECRET", "k")
    args = build_parser().parse_args(["gateway"])
    assert from_args(GatewaySettings, args, redis_url="redis://r").trace_tenant_secret == "k"
    assert "--trace-tenant-secret" not in build_parser().format_help()


@pytest.mark.usefixtures("no_meshserve_variables")
def test_a_missing_redis_url_is_named_when_the_service_starts() -> None:
    args = build_parser().parse_args(["worker", "--model-repository", "/m"])
    with pytest.raises(SystemExit, match=r"--redis-url \(or MESHSERVE_REDIS_URL\) is required"):
        from_args(WorkerSettings, args)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker"])  # --model-repository: at parse time, as argparse says


def test_log_flags_go_before_or_after_the_subcommand() -> None:
    parser = build_parser()
    assert parser.parse_args(["--log-level", "DEBUG", "worker", "--model-repository", "/m"]).log_level == "DEBUG"
    assert parser.parse_args(["worker", "--model-repository", "/m", "--log-level", "DEBUG"]).log_level == "DEBUG"
    assert parser.parse_args(["up", "--log-format", "json"]).log_format == "json"


def plan_up(flags: list[str]) -> list[ChildSpec]:
    args = build_parser().parse_args(["up", *flags])
    return plan_children(
        args, [cpu_device()], repository=Path("/m"), redis_url="redis://r:6379/0", router_address="127.0.0.1:9"
    )


def settings_of(spec: ChildSpec) -> Any:
    """What the child builds from the command line ``up`` gives it."""
    return from_args(SERVICES[spec.role], build_parser().parse_args([spec.role, *spec.args]))


@pytest.mark.usefixtures("no_meshserve_variables")
def test_up_passes_its_knobs_to_the_services_that_have_them() -> None:
    router, worker, gateway = plan_up(
        [
            *("--max-message-bytes", "1024", "--default-timeout-ms", "900", "--lame-duck-s", "0"),
            *("--lease-ms", "750", "--max-attempts", "5", "--canary-interval-s", "0", "--intra-op-spinning"),
            *("--trace-tenant", "off", "--metrics-host", "0.0.0.0", "--log-level", "DEBUG"),
        ]
    )
    for spec in (router, worker, gateway):
        assert settings_of(spec).metrics_host == "0.0.0.0"
        parsed = build_parser().parse_args([spec.role, *spec.args])
        assert (parsed.log_level, parsed.log_format) == ("DEBUG", "text")
    gateway_settings = settings_of(gateway)
    assert (gateway_settings.max_message_bytes, gateway_settings.default_timeout_ms) == (1024, 900)
    assert (gateway_settings.lame_duck_s, gateway_settings.trace_tenant) == (0.0, "off")
    worker_settings = settings_of(worker)
    assert (worker_settings.lease_ms, worker_settings.max_attempts) == (750, 5)
    assert (worker_settings.canary_interval_s, worker_settings.intra_op_spinning) == (0.0, True)
    assert worker_settings.trace_tenant == "off"
    assert worker_settings.max_message_bytes == 1024  # the workers refuse replies over it too


@pytest.mark.usefixtures("no_meshserve_variables")
def test_up_leaves_a_knob_not_given_to_the_child_and_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _, worker, gateway = plan_up([])
    assert "--lease-ms" not in worker.args
    assert "--max-message-bytes" not in gateway.args
    assert dataclasses.replace(settings_of(worker), worker_id="") == WorkerSettings(
        redis_url="redis://r:6379/0",
        router_address="127.0.0.1:9",
        model_repository=Path("/m"),
        metrics_port=8003,
        metrics_host="127.0.0.1",  # up's own default: one machine
    )
    monkeypatch.setenv("MESHSERVE_LEASE_MS", "750")  # what the child inherits from up
    assert settings_of(worker).lease_ms == 750


def test_trace_tenant_is_a_choice_on_gateway_and_worker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESHSERVE_TRACE_TENANT", "hash")
    parser = build_parser()
    assert parser.parse_args(["gateway"]).trace_tenant == "hash"
    assert parser.parse_args(["worker", "--model-repository", "/m", "--trace-tenant", "off"]).trace_tenant == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["gateway", "--trace-tenant", "plain"])
    assert "invalid choice: 'plain'" in capsys.readouterr().err


async def test_a_service_freezes_its_startup_heap_and_stops_on_sigterm() -> None:
    """Objects made during start-up are kept out of later full GC passes (whose
    pauses would land on requests), and SIGTERM leads to the service's stop."""
    events: list[str] = []
    frozen: list[int] = []

    async def start() -> None:
        events.append("start")
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)

    async def stop() -> None:
        events.append("stop")
        frozen.append(gc.get_freeze_count())

    try:
        async with asyncio.timeout(10):
            await serve_until_signal(start, stop)
    finally:
        gc.unfreeze()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    assert events == ["start", "stop"]
    assert frozen[0] > 0


@pytest.mark.usefixtures("no_meshserve_variables")
def test_a_gateway_without_tenants_file_defaults_to_loopback(tmp_path: Path) -> None:
    def listen_host(flags: list[str]) -> str:
        args = build_parser().parse_args(["gateway", "--redis-url", "r", *flags])
        return from_args(GatewaySettings, args).listen_host

    assert listen_host([]) == "127.0.0.1"
    assert listen_host(["--host", "0.0.0.0"]) == "0.0.0.0"
    # with a tenants file: every interface, as before
    assert listen_host(["--tenants", str(tmp_path / "t.yaml")]) == "0.0.0.0"
    assert listen_host(["--tenants", str(tmp_path / "t.yaml"), "--host", "10.0.0.7"]) == "10.0.0.7"


@pytest.mark.usefixtures("no_meshserve_variables")
def test_up_keeps_one_machine_on_loopback_unless_told() -> None:
    router, worker, gateway = plan_up([])
    assert "--host" not in gateway.args  # the gateway's own default for its tenancy
    assert settings_of(gateway).listen_host == "127.0.0.1"
    assert {settings_of(spec).metrics_host for spec in (router, worker, gateway)} == {"127.0.0.1"}
    assert settings_of(worker).health_host == "127.0.0.1"
    assert settings_of(router).host == "127.0.0.1"  # up dials it there; nothing else needs it

    _, _, with_tenants = plan_up(["--tenants", "/etc/meshserve/tenants.yaml"])
    assert settings_of(with_tenants).listen_host == "0.0.0.0"


@pytest.mark.usefixtures("no_meshserve_variables")
def test_up_passes_the_hosts_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    router, worker, gateway = plan_up(["--host", "0.0.0.0", "--metrics-host", "0.0.0.0", "--health-host", "0.0.0.0"])
    assert settings_of(gateway).listen_host == "0.0.0.0"
    assert {settings_of(spec).metrics_host for spec in (router, worker, gateway)} == {"0.0.0.0"}
    assert settings_of(worker).health_host == "0.0.0.0"
    monkeypatch.setenv("MESHSERVE_METRICS_HOST", "10.0.0.7")  # up's own default, passed as a flag
    assert {settings_of(spec).metrics_host for spec in plan_up([])} == {"10.0.0.7"}


@pytest.mark.usefixtures("no_meshserve_variables")
def test_up_passes_the_control_mode_and_repeated_load_model_to_the_router() -> None:
    flags = ["--model-control-mode", "explicit", "--load-model", "mlp", "--load-model", "cnn"]
    router = next(spec for spec in plan_up([*flags, "--unload-drain-s", "5"]) if spec.role == "router")
    settings = settings_of(router)
    assert settings.model_control_mode == "explicit"
    assert settings.load_model == ("mlp", "cnn")
    assert settings.unload_drain_s == 5.0
    default = settings_of(next(spec for spec in plan_up([]) if spec.role == "router"))
    assert (default.model_control_mode, default.load_model) == ("none", ())


def test_load_model_reads_a_comma_separated_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHSERVE_LOAD_MODEL", "mlp, cnn")
    args = build_parser().parse_args(["router", "--model-repository", "/m"])
    assert from_args(RouterSettings, args).load_model == ("mlp", "cnn")


@pytest.mark.usefixtures("no_meshserve_variables")
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model-control-mode", "poll", "--repository-poll-s", "0"], "--repository-poll-s must be > 0"),
        (["--load-model", "mlp"], "--load-model needs --model-control-mode explicit"),
    ],
)
def test_the_router_refuses_control_flags_that_cannot_work(flags: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["router", "--model-repository", str(tmp_path), *flags])
    assert message in str(refused.value)
