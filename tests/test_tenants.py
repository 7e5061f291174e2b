"""The tenants file: parsing, every refusal with its line, globs, keys, reloads."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from meshserve.tenancy.tenants import (
    DEV_TENANT,
    Tenant,
    TenantRegistry,
    TenantsFileError,
    bearer_key,
    dev_registry,
    hash_key,
    load_tenants,
    reload_tenants,
)

ACME_KEY = "acme-key-0123456789"
ACME_KEY_2 = "acme-key-second"
BETA_KEY = "beta-key-9876543210"

GOOD = f"""\
tenants:
  - name: acme
    api_keys: ["{hash_key(ACME_KEY)}", "{hash_key(ACME_KEY_2)}"]
    tier: realtime
    weight: 2.5
    rate_per_s: 200
    burst: 400
    max_inflight: 64
    max_queued: 256
    models: ["resnet*", "bert-base"]
  - name: beta
    api_keys:
      - {hash_key(BETA_KEY).upper().replace("SHA256", "sha256")}
    models: ["*"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_hash_key_is_what_the_issue_shows() -> None:
    assert hash_key("test") == "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def test_a_good_file_loads_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    registry = load_tenants(path)
    assert not registry.open
    assert registry.source == path
    assert sorted(registry.tenants) == ["acme", "beta"]
    acme = registry.tenants["acme"]
    assert acme.tier == 0
    assert acme.weight == 2.5
    assert (acme.rate_per_s, acme.burst, acme.max_inflight, acme.max_queued) == (200.0, 400, 64, 256)
    assert acme.models == ("resnet*", "bert-base")
    assert len(acme.key_hashes) == 2
    assert all(len(digest) == 32 for digest in acme.key_hashes)
    beta = registry.get("beta")
    assert beta is not None
    # Defaults: standard tier, weight 1, no limits.
    assert (beta.tier, beta.weight, beta.rate_per_s, beta.max_inflight, beta.max_queued) == (1, 1.0, 0.0, 0, 0)


def test_burst_defaults_to_one_seconds_worth(tmp_path: Path) -> None:
    text = f"""\
    tenants:
      - name: a
        api_keys: ["{hash_key("k")}"]
        rate_per_s: 2.5
        models: ["*"]
    """
    assert load_tenants(write(tmp_path, text)).tenants["a"].burst == 3


def test_authenticate_right_wrong_and_missing_keys(tmp_path: Path) -> None:
    registry = load_tenants(write(tmp_path, GOOD))
    acme = registry.authenticate(ACME_KEY)
    assert acme is not None
    assert acme.name == "acme"
    assert registry.authenticate(ACME_KEY_2) is acme
    beta = registry.authenticate(BETA_KEY)  # stored as upper-case hex: still found
    assert beta is not None
    assert beta.name == "beta"
    assert registry.authenticate(ACME_KEY + "x") is None
    assert registry.authenticate(ACME_KEY[:-1]) is None
    assert registry.authenticate(hash_key(ACME_KEY)) is None  # the hash is not the key
    assert registry.authenticate("") is None
    assert registry.authenticate(None) is None
    assert registry.authenticate("\udcff") is None  # a lone surrogate is just a wrong key


def test_each_of_two_thousand_keys_finds_its_own_tenant(tmp_path: Path) -> None:
    """The tenants file of a large SaaS: every key finds its tenant, no other one."""
    lines = ["tenants:"]
    for i in range(2_000):
        lines += [f"  - name: t{i}", f'    api_keys: ["{hash_key(f"key-{i}")}"]', '    models: ["*"]']
    registry = load_tenants(write(tmp_path, "\n".join(lines) + "\n"))
    found = [registry.authenticate(f"key-{i}") for i in range(2_000)]
    assert [tenant.name if tenant else None for tenant in found] == [f"t{i}" for i in range(2_000)]
    assert registry.authenticate("key-2000") is None


def test_bearer_key_reads_the_authorization_value() -> None:
    assert bearer_key("Bearer abc") == "abc"
    assert bearer_key("bearer   abc  ") == "abc"
    assert bearer_key("Basic abc") is None
    assert bearer_key("Bearer") is None
    assert bearer_key("Bearer ") is None
    assert bearer_key("") is None
    assert bearer_key(None) is None


def test_may_use_matches_globs_case_sensitively(tmp_path: Path) -> None:
    acme = load_tenants(write(tmp_path, GOOD)).tenants["acme"]
    assert acme.may_use("resnet50")
    assert acme.may_use("resnet")
    assert acme.may_use("bert-base")
    assert not acme.may_use("bert-base-2")
    assert not acme.may_use("ResNet50")
    assert not acme.may_use("gpt")


def test_dev_registry_is_open_to_any_key_or_none() -> None:
    registry = dev_registry()
    assert registry.open
    for key in (None, "", "anything"):
        tenant = registry.authenticate(key)
        assert tenant is not None
        assert tenant.name == DEV_TENANT
        assert tenant.may_use("any/model")
        assert (tenant.rate_per_s, tenant.max_inflight, tenant.max_queued) == (0.0, 0, 0)


def test_registry_refuses_duplicates_built_in_code() -> None:
    def tenant(name: str, key: str) -> Tenant:
        digest = bytes.fromhex(hash_key(key).removeprefix("sha256:"))
        return Tenant(name, frozenset({digest}), 1, 1.0, 0.0, 0, 0, 0, ("*",))

    with pytest.raises(ValueError, match="duplicate tenant name"):
        TenantRegistry([tenant("a", "k1"), tenant("a", "k2")])
    with pytest.raises(ValueError, match="a key of tenant 'a'"):
        TenantRegistry([tenant("a", "k1"), tenant("b", "k1")])
    named = [dataclasses.replace(tenant(name, name), identities=frozenset({"svc"})) for name in ("a", "b")]
    with pytest.raises(ValueError, match="identity 'svc' of tenant 'a'"):
        TenantRegistry(named)


def test_certificate_names_authenticate_their_one_tenant(tmp_path: Path) -> None:
    registry = load_tenants(
        write(
            tmp_path,
            f"""\
            tenants:
              - name: orders
                mtls_identities: ["spiffe://acme.example/orders", "orders.internal"]
                models: ["*"]
              - name: billing
                api_keys: ["{hash_key(BETA_KEY)}"]
                mtls_identities: ["billing.internal"]
                models: ["*"]
            """,
        )
    )
    orders = registry.tenants["orders"]
    assert orders.key_hashes == frozenset()
    assert orders.identities == {"spiffe://acme.example/orders", "orders.internal"}
    assert registry.authenticate_peer(["localhost", "orders.internal"]) is orders
    assert registry.authenticate_peer(["spiffe://acme.example/orders"]) is orders
    assert registry.authenticate_peer(["billing.internal"]) is registry.tenants["billing"]
    assert registry.authenticate_peer([]) is None
    assert registry.authenticate_peer(["ORDERS.internal", "stranger"]) is None  # exact names only
    # names of two tenants in one certificate: no guess between them
    assert registry.authenticate_peer(["orders.internal", "billing.internal"]) is None
    assert registry.authenticate(BETA_KEY) is registry.tenants["billing"]
    assert dev_registry().authenticate_peer([]) is not None  # the open tenant is everyone


KEY_A = hash_key("key-a")
KEY_B = hash_key("key-b")

# Each case: the file, the line at fault, and a piece of the message.
BAD_FILES = {
    "yaml syntax": (
        """\
        tenants:
          - name: a
            models: [unclosed
        """,
        4,
        "invalid YAML",
    ),
    "empty file": ("", None, "empty file"),
    "unsafe tag": (
        """\
        tenants:
          - name: !!python/name:os.system a
        """,
        2,
        "cannot read this value",
    ),
    "bad explicit tag": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: ["*"]
            burst: !!int abc
        """,
        5,
        "cannot read this value",
    ),
    "top level not a mapping": ("- a\n", 1, "the top level must be a mapping"),
    "unknown top-level key": ("tenants: []\nextra: 1\n", 2, "unknown key 'extra'"),
    "missing tenants": ("{}\n", 1, "missing 'tenants'"),
    "tenants not a list": ("tenants: {}\n", 1, "'tenants' must be a list"),
    "tenant not a mapping": ("tenants:\n  - just-a-name\n", 2, "a tenant must be a mapping"),
    "unknown tenant key": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: ["*"]
            rate: 5
        """,
        5,
        "unknown key 'rate'",
    ),
    "key given twice": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: ["*"]
            models: ["m"]
        """,
        5,
        "'models' given twice",
    ),
    "missing name": (
        f"""\
        tenants:
          - api_keys: ["{KEY_A}"]
            models: ["*"]
        """,
        2,
        "missing 'name'",
    ),
    "bad name": (
        f"""\
        tenants:
          - name: "a{{b}}"
            api_keys: ["{KEY_A}"]
            models: ["*"]
        """,
        2,
        "tenant name must be",
    ),
    "name not a string": (
        f"""\
        tenants:
          - name: [a]
            api_keys: ["{KEY_A}"]
            models: ["*"]
        """,
        2,
        "tenant name must be",
    ),
    "missing api_keys": (
        """\
        tenants:
          - name: a
            models: ["*"]
        """,
        2,
        "tenant 'a': missing 'api_keys' (or 'mtls_identities')",
    ),
    "missing models": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
        """,
        2,
        "tenant 'a': missing 'models'",
    ),
    "bad tier": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            tier: gold
            models: ["*"]
        """,
        4,
        "'tier' must be one of realtime, standard, batch, got 'gold'",
    ),
    "negative rate": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: ["*"]
            rate_per_s: -5
        """,
        5,
        "'rate_per_s' must be a number >= 0, got -5",
    ),
    "rate not a number": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: ["*"]
            rate_per_s: fast
        """,
        5,
        "'rate_per_s' must be a number >= 0, got 'fast'",
    ),
    "infinite rate": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: ["*"]
            rate_per_s: .inf
        """,
        5,
        "'rate_per_s' must be a number >= 0",
    ),
    "negative max_inflight": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: ["*"]
            max_inflight: -1
        """,
        5,
        "'max_inflight' must be an integer >= 0, got -1",
    ),
    "fractional max_queued": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: ["*"]
            max_queued: 1.5
        """,
        5,
        "'max_queued' must be an integer >= 0, got 1.5",
    ),
    "boolean burst": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: ["*"]
            burst: true
        """,
        5,
        "'burst' must be an integer >= 0, got True",
    ),
    "zero burst with a rate": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: ["*"]
            rate_per_s: 10
            burst: 0
        """,
        6,
        "'burst' must be at least 1",
    ),
    "zero weight": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: ["*"]
            weight: 0
        """,
        5,
        "'weight' must be a number > 0",
    ),
    "api_keys not a list": (
        f"""\
        tenants:
          - name: a
            api_keys: "{KEY_A}"
            models: ["*"]
        """,
        3,
        "'api_keys' must be a non-empty list",
    ),
    "no api_keys": (
        """\
        tenants:
          - name: a
            api_keys: []
            models: ["*"]
        """,
        3,
        "'api_keys' must be a non-empty list",
    ),
    "a key in clear": (
        f"""\
        tenants:
          - name: a
            api_keys:
              - "{KEY_A}"
              - "my-secret-key"
            models: ["*"]
        """,
        5,
        "api_keys[1] is not 'sha256:<64 hex digits>'",
    ),
    "short hash": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A[:-1]}"]
            models: ["*"]
        """,
        3,
        "api_keys[0] is not 'sha256:<64 hex digits>'",
    ),
    "other algorithm": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A.replace("sha256", "md5")}"]
            models: ["*"]
        """,
        3,
        "api_keys[0] is not",
    ),
    "hash of the empty key": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{hash_key("")}"]
            models: ["*"]
        """,
        3,
        "the hash of an empty key",
    ),
    "duplicate tenant name": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: ["*"]
          - name: a
            api_keys: ["{KEY_B}"]
            models: ["*"]
        """,
        5,
        "duplicate tenant name 'a' (first at line 2)",
    ),
    "key shared across tenants": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: ["*"]
          - name: b
            api_keys:
              - "{KEY_B}"
              - "{KEY_A.upper().replace("SHA256", "sha256")}"
            models: ["*"]
        """,
        8,
        "tenant 'b': api_keys[1] is already a key of tenant 'a' (line 3)",
    ),
    "key repeated in one tenant": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}", "{KEY_A}"]
            models: ["*"]
        """,
        3,
        "api_keys[1] is already a key of tenant 'a'",
    ),
    "certificate name of another tenant": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            mtls_identities: ["svc.internal"]
            models: ["*"]
          - name: b
            mtls_identities:
              - other.internal
              - svc.internal
            models: ["*"]
        """,
        9,
        "mtls_identities[1] 'svc.internal' already names tenant 'a' (line 4)",
    ),
    "empty certificate name": (
        """\
        tenants:
          - name: a
            mtls_identities: [""]
            models: ["*"]
        """,
        3,
        "mtls_identities[0] must be a non-empty name",
    ),
    "models not a list": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models: "*"
        """,
        4,
        "'models' must be a non-empty list",
    ),
    "empty model pattern": (
        f"""\
        tenants:
          - name: a
            api_keys: ["{KEY_A}"]
            models:
              - m
              - ""
        """,
        6,
        "models[1] must be a non-empty string",
    ),
}


@pytest.mark.parametrize(("text", "line", "message"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_every_error_names_the_file_and_line(tmp_path: Path, text: str, line: int | None, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(TenantsFileError) as caught:
        load_tenants(path)
    error = caught.value
    assert error.line == line, str(error)
    assert message in error.reason, str(error)
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(error).startswith(where), str(error)


def test_a_key_in_clear_is_never_echoed(tmp_path: Path) -> None:
    text = """\
    tenants:
      - name: a
        api_keys: ["sk-live-very-secret"]
        models: ["*"]
    """
    with pytest.raises(TenantsFileError) as caught:
        load_tenants(write(tmp_path, text))
    assert "very-secret" not in str(caught.value)


def test_an_unreadable_file_is_an_error_without_a_line(tmp_path: Path) -> None:
    with pytest.raises(TenantsFileError, match="cannot read") as caught:
        load_tenants(tmp_path / "missing.yaml")
    assert caught.value.line is None


def test_an_empty_tenant_list_is_valid_and_admits_no_one(tmp_path: Path) -> None:
    registry = load_tenants(write(tmp_path, "tenants: []\n"))
    assert len(registry) == 0
    assert registry.authenticate(ACME_KEY) is None


def test_reload_replaces_a_good_file_and_keeps_the_old_on_a_bad_one(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    current = load_tenants(path)

    path.write_text(GOOD.replace("name: beta", "name: gamma"), encoding="utf-8")
    reloaded, error = reload_tenants(path, current)
    assert error is None
    assert sorted(reloaded.tenants) == ["acme", "gamma"]

    path.write_text(GOOD.replace("tier: realtime", "tier: urgent"), encoding="utf-8")
    kept, error = reload_tenants(path, reloaded)
    assert kept is reloaded
    assert error is not None
    assert error.line == 4
    assert "urgent" in str(error)

    path.unlink()
    kept, error = reload_tenants(path, reloaded)
    assert kept is reloaded
    assert error is not None


def test_admin_is_off_unless_set_true_and_must_be_a_boolean(tmp_path: Path) -> None:
    text = f"""\
    tenants:
      - name: ops
        api_keys: ["{hash_key("k1")}"]
        models: ["*"]
        admin: true
      - name: user
        api_keys: ["{hash_key("k2")}"]
        models: ["*"]
    """
    registry = load_tenants(write(tmp_path, text))
    assert registry.tenants["ops"].admin
    assert not registry.tenants["user"].admin
    assert dev_registry().tenants["dev"].admin  # open development mode: all allowed
    with pytest.raises(TenantsFileError) as caught:
        load_tenants(write(tmp_path, text.replace("admin: true", 'admin: "yes"')))
    assert "tenant 'ops': 'admin' must be true or false, got 'yes'" in str(caught.value)
