"""Tenants: who may call the mesh, with which key, for which models, within which limits.

A tenants file (YAML, ``--tenants FILE`` / ``MESHSERVE_TENANTS``) declares every tenant::

    tenants:
      - name: acme                  # 1-63 of [A-Za-z0-9._-]; it goes into Redis keys
        api_keys: ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
        tier: realtime              # realtime | standard | batch   (default standard)
        weight: 1                   # fair share inside its tier, > 0   (default 1)
        rate_per_s: 200             # requests per second; 0 = no limit (default 0)
        burst: 400                  # admitted at once from idle (default: one second's worth)
        max_inflight: 64            # admitted and not yet answered; 0 = no limit (default 0)
        max_queued: 256             # waiting in queues; 0 = no limit (default 0)
        models: ["*"]               # fnmatch patterns, case-sensitive
        mtls_identities: ["spiffe://acme.example/orders"]  # client certificate names
        admin: false                # may load and unload models (RepositoryModelLoad/Unload)
        shared_memory: {allowed: true, key_prefix: "/acme-"}  # system shared memory (gateway/shm.py)

``name`` and ``models`` are required, and ``api_keys`` or ``mtls_identities`` (or
both). The file holds only SHA-256 hashes of keys (``hash_key`` makes one); a plain
key is refused. Keys must be random and long (e.g. ``secrets.token_urlsafe(32)``): an
unsalted fast hash is right for such keys and wrong for passwords.

``mtls_identities`` are names a client certificate carries, as gRPC reports them for a
verified peer (``ServicerContext.peer_identities()``: its subject alternative names,
or its common name when it has none). On a gateway with mutual TLS a call without an
API key is the tenant one of its certificate's names belongs to; a key, when sent,
decides alone. A name belongs to one tenant at most.

A bad file is refused whole with ``TenantsFileError``, whose message names the file and
the line at fault; ``reload_tenants`` keeps the registry in force when that happens.

The tenant comes only from the verified key or certificate (DESIGN.md, "Security in
one paragraph"), never from a request field. ``dev_registry()`` is the exception, for
development only: one open tenant that every caller becomes.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NoReturn

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from meshserve.queue.tiers import DEFAULT_TIER, TIERS

DEV_TENANT = "dev"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_KEY_HASH = re.compile(r"sha256:([0-9a-fA-F]{64})")
_SHM_PREFIX = re.compile(r"/[A-Za-z0-9._-]{1,63}")
_EMPTY_KEY_DIGEST = hashlib.sha256(b"").digest()

_FIELDS = (
    "name",
    "api_keys",
    "mtls_identities",
    "tier",
    "weight",
    "rate_per_s",
    "burst",
    "max_inflight",
    "max_queued",
    "models",
    "admin",
    "shared_memory",
)
_REQUIRED = ("name", "models")


@dataclass(frozen=True, slots=True)
class Tenant:
    """One tenant and its limits; 0 means "no limit" for rate and counts."""

    name: str
    key_hashes: frozenset[bytes]
    """Raw 32-byte SHA-256 digests of the tenant's API keys."""
    tier: int
    weight: float
    rate_per_s: float
    burst: int
    max_inflight: int
    max_queued: int
    models: tuple[str, ...]
    """Glob patterns (``fnmatch``, case-sensitive) of the model names it may use."""
    identities: frozenset[str] = frozenset()
    """Client certificate names (``mtls_identities``) that authenticate as this tenant."""
    admin: bool = False
    """May change what the mesh serves (the repository API's Load and Unload)."""
    shared_memory_prefix: str | None = None
    """System shared memory: the prefix every region key must start with; None: not
    allowed; "": any key (the open development tenant only)."""

    def may_use(self, model_name: str) -> bool:
        """True if any pattern matches. Check this before looking the model up, so a
        refusal says nothing about whether the model exists."""
        return any(fnmatchcase(model_name, pattern) for pattern in self.models)


class TenantRegistry:
    """The tenants in force, and authentication against their keys.

    ``open`` marks the development registry (``dev_registry``): every caller, with
    any key or none, is its one tenant. A gateway running open should say so loudly.
    ``source`` is the file it was loaded from (None when built in code).

    Authentication hashes the presented key once and looks the SHA-256 digest up in a
    dict. Whatever the lookup's timing leaks is about the digest of the presented key,
    never about a stored key's characters: to use it an attacker would need keys whose
    digests share a prefix with a stored digest, i.e. a preimage attack on SHA-256.
    (This was a constant-time scan over every stored digest; at 10 000 tenants it cost
    750 µs a call, more than the rest of the gateway: docs/performance.md, "Scaling of
    cost".)
    """

    __slots__ = ("_by_digest", "_by_identity", "_tenants", "open", "source")

    def __init__(self, tenants: Iterable[Tenant], *, open: bool = False, source: Path | None = None) -> None:
        self._tenants: dict[str, Tenant] = {}
        by_digest: dict[bytes, Tenant] = {}
        self._by_identity: dict[str, Tenant] = {}
        for tenant in tenants:
            if tenant.name in self._tenants:
                raise ValueError(f"duplicate tenant name {tenant.name!r}")
            self._tenants[tenant.name] = tenant
            for digest in tenant.key_hashes:
                if digest in by_digest:
                    raise ValueError(f"tenant {tenant.name!r}: a key of tenant {by_digest[digest].name!r}")
                by_digest[digest] = tenant
            for identity in tenant.identities:
                if identity in self._by_identity:
                    owner = self._by_identity[identity].name
                    raise ValueError(f"tenant {tenant.name!r}: identity {identity!r} of tenant {owner!r}")
                self._by_identity[identity] = tenant
        if open and len(self._tenants) != 1:
            raise ValueError("an open registry has exactly one tenant")
        self._by_digest = by_digest
        self.open = open
        self.source = source

    @property
    def tenants(self) -> Mapping[str, Tenant]:
        return self._tenants

    def get(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    def __len__(self) -> int:
        return len(self._tenants)

    def authenticate(self, api_key: str | None) -> Tenant | None:
        """The tenant whose key this is; None for a missing or unknown key.

        One dict lookup by the key's digest (see the class docstring).
        An open registry returns its tenant for any key or none.
        """
        if self.open:
            return next(iter(self._tenants.values()))
        if not api_key:
            return None
        digest = hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).digest()
        return self._by_digest.get(digest)

    def authenticate_peer(self, identities: Iterable[str]) -> Tenant | None:
        """The tenant a verified client certificate's names belong to; None when none
        does, or when they belong to different tenants (never a guess between them).

        A certificate's names are not secrets (TLS has already proven them), so this
        is a plain lookup. An open registry returns its tenant.
        """
        if self.open:
            return next(iter(self._tenants.values()))
        found = {tenant.name: tenant for name in identities if (tenant := self._by_identity.get(name)) is not None}
        return next(iter(found.values())) if len(found) == 1 else None


def hash_key(key: str) -> str:
    """What an operator writes in the tenants file for ``key``.

    >>> hash_key("test")
    'sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08'

    To issue a key: ``python -c "import secrets; print(secrets.token_urlsafe(32))"``,
    give it to the tenant, and keep only ``hash_key`` of it.
    """
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def bearer_key(authorization: str | None) -> str | None:
    """The key in an ``authorization: Bearer <key>`` metadata value.

    None when the value is absent, empty, or of another scheme (the scheme name is
    case-insensitive, RFC 7235).
    """
    if authorization is None:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


def dev_registry() -> TenantRegistry:
    """One open tenant, ``dev``, for development without a tenants file.

    Every caller becomes ``dev`` whatever key it sends, or none: standard tier, every
    model, no limits. Never run it where anyone else can reach the gateway.
    """
    dev = Tenant(
        name=DEV_TENANT,
        key_hashes=frozenset(),
        tier=DEFAULT_TIER,
        weight=1.0,
        rate_per_s=0.0,
        burst=0,
        max_inflight=0,
        max_queued=0,
        models=("*",),
        admin=True,
        shared_memory_prefix="",
    )
    return TenantRegistry([dev], open=True)


class TenantsFileError(Exception):
    """A tenants file that cannot be used: ``path:line: what is wrong``.

    ``line`` is 1-based, None when the file cannot be read at all. Messages never
    quote an ``api_keys`` entry, which might be a key pasted in clear.
    """

    def __init__(self, path: Path, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


def load_tenants(path: Path) -> TenantRegistry:
    """Read and validate a tenants file; the whole file or nothing."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TenantsFileError(path, None, f"cannot read: {exc}") from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        raise TenantsFileError(path, line, f"invalid YAML: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise TenantsFileError(path, None, f"invalid YAML: {exc}") from exc
    return _Parser(path).registry(root)


def reload_tenants(path: Path, current: TenantRegistry) -> tuple[TenantRegistry, TenantsFileError | None]:
    """Load ``path`` again (on SIGHUP or the router's RPC).

    Returns the new registry and None, or ``current`` unchanged and the error, which
    the caller logs: a bad file never replaces a good one.
    """
    try:
        return load_tenants(path), None
    except TenantsFileError as exc:
        return current, exc


# --- validation, with the line of every node ----------------------------------------------


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


_Fields = dict[str, tuple[ScalarNode, Node]]
"""A YAML mapping's keys, each with its key node and value node."""


class _Parser:
    """Walks the composed YAML nodes, so every error can name its line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.constructor = SafeConstructor()
        self.names: dict[str, int] = {}
        self.digests: dict[bytes, tuple[str, int]] = {}
        self.identities: dict[str, tuple[str, int]] = {}
        self.prefixes: dict[str, tuple[str, int]] = {}

    def fail(self, node: Node, reason: str) -> NoReturn:
        raise TenantsFileError(self.path, _line(node), reason)

    def registry(self, root: Node | None) -> TenantRegistry:
        if root is None:
            raise TenantsFileError(self.path, None, "empty file: expected 'tenants:' and a list of tenants")
        fields = self.mapping(root, "the top level", ("tenants",))
        if "tenants" not in fields:
            self.fail(root, "missing 'tenants'")
        items = fields["tenants"][1]
        if not isinstance(items, SequenceNode):
            self.fail(items, "'tenants' must be a list")
        return TenantRegistry([self.tenant(item) for item in items.value], source=self.path)

    def mapping(self, node: Node, what: str, allowed: tuple[str, ...]) -> _Fields:
        if not isinstance(node, MappingNode):
            self.fail(node, f"{what} must be a mapping")
        fields: _Fields = {}
        for key_node, value_node in node.value:
            key = self.value(key_node) if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str):
                self.fail(key_node, f"{what}: keys must be strings")
            if key not in allowed:
                self.fail(key_node, f"{what}: unknown key '{key}' (allowed: {', '.join(allowed)})")
            if key in fields:
                self.fail(key_node, f"{what}: '{key}' given twice")
            fields[key] = (key_node, value_node)
        return fields

    def value(self, node: Node) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as exc:  # e.g. "!!int abc", "!!python/name:os.system"
            problem = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else exc
            self.fail(node, f"cannot read this value: {problem}")

    def tenant(self, node: Node) -> Tenant:
        fields = self.mapping(node, "a tenant", _FIELDS)
        name = self.name(node, fields)
        what = f"tenant '{name}'"
        for key in _REQUIRED:
            if key not in fields:
                self.fail(node, f"{what}: missing '{key}'")
        if "api_keys" not in fields and "mtls_identities" not in fields:
            self.fail(node, f"{what}: missing 'api_keys' (or 'mtls_identities'): nothing could authenticate as it")
        rate_per_s = self.number(fields, "rate_per_s", what, default=0.0)
        burst = self.integer(fields, "burst", what, default=max(1, math.ceil(rate_per_s)))
        if rate_per_s > 0 and burst < 1:
            self.fail(fields["burst"][1], f"{what}: 'burst' must be at least 1 when 'rate_per_s' is set")
        weight = self.number(fields, "weight", what, default=1.0)
        if weight <= 0:
            self.fail(fields["weight"][1], f"{what}: 'weight' must be a number > 0, got {weight!r}")
        return Tenant(
            name=name,
            key_hashes=self.key_hashes(name, fields["api_keys"][1]) if "api_keys" in fields else frozenset(),
            tier=self.tier(fields, what),
            weight=weight,
            rate_per_s=rate_per_s,
            burst=burst,
            max_inflight=self.integer(fields, "max_inflight", what, default=0),
            max_queued=self.integer(fields, "max_queued", what, default=0),
            models=self.models(fields["models"][1], what),
            identities=self.mtls_identities(name, fields["mtls_identities"][1])
            if "mtls_identities" in fields
            else frozenset(),
            admin=self.flag(fields, "admin", what),
            shared_memory_prefix=self.shared_memory(name, fields),
        )

    def name(self, node: Node, fields: _Fields) -> str:
        if "name" not in fields:
            self.fail(node, "a tenant is missing 'name'")
        name_node = fields["name"][1]
        name = self.value(name_node) if isinstance(name_node, ScalarNode) else None
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            self.fail(
                name_node,
                f"tenant name must be 1-63 of letters, digits, '.', '_', '-', starting with a letter or digit,"
                f" got {name!r}",
            )
        if name in self.names:
            self.fail(name_node, f"duplicate tenant name '{name}' (first at line {self.names[name]})")
        self.names[name] = _line(name_node)
        return name

    def flag(self, fields: _Fields, key: str, what: str) -> bool:
        if key not in fields:
            return False
        node = fields[key][1]
        value = self.value(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, bool):
            self.fail(node, f"{what}: '{key}' must be true or false, got {value!r}")
        return value

    def number(self, fields: _Fields, key: str, what: str, *, default: float) -> float:
        if key not in fields:
            return default
        node = fields[key][1]
        value = self.value(node) if isinstance(node, ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            self.fail(node, f"{what}: '{key}' must be a number >= 0, got {value!r}")
        return float(value)

    def integer(self, fields: _Fields, key: str, what: str, *, default: int) -> int:
        if key not in fields:
            return default
        node = fields[key][1]
        value = self.value(node) if isinstance(node, ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(node, f"{what}: '{key}' must be an integer >= 0, got {value!r}")
        return value

    def tier(self, fields: _Fields, what: str) -> int:
        if "tier" not in fields:
            return DEFAULT_TIER
        node = fields["tier"][1]
        value = self.value(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, str) or value not in TIERS:
            self.fail(node, f"{what}: 'tier' must be one of {', '.join(TIERS)}, got {value!r}")
        return TIERS[value]

    def entries(self, node: Node, empty: str) -> Iterator[tuple[int, Node, Any]]:
        """(index, node, value) of a non-empty list's entries; ``empty`` is the error
        for a missing or empty list. A value is None where the entry is no scalar."""
        if not isinstance(node, SequenceNode) or not node.value:
            self.fail(node, empty)
        for index, item in enumerate(node.value):
            yield index, item, self.value(item) if isinstance(item, ScalarNode) else None

    def claim(self, owners: dict[Any, tuple[str, int]], value: Any, name: str, item: Node, taken: str) -> None:
        """Record that ``value`` is tenant ``name``'s; ``taken`` ends the error when
        it is already a tenant's: it gets that tenant and its line appended."""
        if value in owners:
            owner, line = owners[value]
            self.fail(item, f"{taken} '{owner}' (line {line})")
        owners[value] = (name, _line(item))

    def key_hashes(self, name: str, node: Node) -> frozenset[bytes]:
        what = f"tenant '{name}'"
        digests: set[bytes] = set()
        empty = f"{what}: 'api_keys' must be a non-empty list of 'sha256:<64 hex digits>'"
        for index, item, value in self.entries(node, empty):
            # Never echo the entry: a malformed one may be a key pasted in clear.
            match = _KEY_HASH.fullmatch(value) if isinstance(value, str) else None
            if match is None:
                self.fail(
                    item,
                    f"{what}: api_keys[{index}] is not 'sha256:<64 hex digits>'"
                    " (the file holds hashes of keys, never keys: see meshserve.tenancy.tenants.hash_key)",
                )
            digest = bytes.fromhex(match.group(1))
            if digest == _EMPTY_KEY_DIGEST:
                self.fail(item, f"{what}: api_keys[{index}] is the hash of an empty key")
            self.claim(self.digests, digest, name, item, f"{what}: api_keys[{index}] is already a key of tenant")
            digests.add(digest)
        return frozenset(digests)

    def mtls_identities(self, name: str, node: Node) -> frozenset[str]:
        what = f"tenant '{name}'"
        identities: set[str] = set()
        empty = f"{what}: 'mtls_identities' must be a non-empty list of certificate names"
        for index, item, value in self.entries(node, empty):
            if not isinstance(value, str) or not value or value != value.strip():
                self.fail(item, f"{what}: mtls_identities[{index}] must be a non-empty name, got {value!r}")
            taken = f"{what}: mtls_identities[{index}] {value!r} already names tenant"
            self.claim(self.identities, value, name, item, taken)
            identities.add(value)
        return frozenset(identities)

    def shared_memory(self, name: str, fields: _Fields) -> str | None:
        """``shared_memory: {allowed, key_prefix}``: the tenant's key prefix, None when
        not allowed. No prefix may start another tenant's: that tenant could map its regions."""
        if "shared_memory" not in fields:
            return None
        what = f"tenant '{name}': shared_memory"
        section = self.mapping(fields["shared_memory"][1], what, ("allowed", "key_prefix"))
        if not self.flag(section, "allowed", what):
            return None
        node = section["key_prefix"][1] if "key_prefix" in section else fields["shared_memory"][1]
        prefix = self.value(node) if "key_prefix" in section and isinstance(node, ScalarNode) else None
        if not isinstance(prefix, str) or not _SHM_PREFIX.fullmatch(prefix):
            self.fail(
                node, f"{what}: 'key_prefix' must be '/' and 1-63 of [A-Za-z0-9._-] (e.g. \"/{name}-\"), got {prefix!r}"
            )
        for other, (owner, line) in self.prefixes.items():
            if other.startswith(prefix) or prefix.startswith(other):
                self.fail(node, f"{what}: 'key_prefix' {prefix!r} overlaps tenant '{owner}''s {other!r} (line {line})")
        self.prefixes[prefix] = (name, _line(node))
        return prefix

    def models(self, node: Node, what: str) -> tuple[str, ...]:
        patterns = []
        for index, item, pattern in self.entries(
            node, f"{what}: 'models' must be a non-empty list of model name patterns"
        ):
            if not isinstance(pattern, str) or not pattern:
                self.fail(item, f"{what}: models[{index}] must be a non-empty string, got {pattern!r}")
            patterns.append(pattern)
        return tuple(patterns)
