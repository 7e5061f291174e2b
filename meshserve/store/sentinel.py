"""Redis Sentinel URLs: where the services find the queues' master.

``redis+sentinel://[user:pass@]host:port[,host:port...]/<master-name>[?db=N]``
names the sentinels, not Redis: the master's address is asked of them whenever a
connection opens (at start, and after every connection lost, READONLY or LOADING:
what a failover looks like from a client). The credentials and ``db`` are the
master's; sentinels that require their own take ``sentinel_username`` and
``sentinel_password`` in the query. redis-py's Sentinel client answers the question
(it also checks that the master is not subjectively or objectively down); the
request path then talks to the master over its own link, never through redis-py.
TLS to a sentinel-managed master is not supported yet (``rediss://`` is, without
Sentinel).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

from redis import Redis as SyncRedis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.sentinel import Sentinel
from redis.sentinel import Sentinel as SyncSentinel

SCHEME = "redis+sentinel"
SENTINEL_TIMEOUT_S = 0.5
"""How long one sentinel may take to answer before the next is asked: they are on
the local network, and a failover's clients are waiting."""

Resolver: TypeAlias = Callable[[], Awaitable[tuple[str, int]]]
"""Where the master is now (host, port); raises redis-py's ``ConnectionError`` when
no sentinel names one (``MasterNotFoundError`` is one)."""


def is_sentinel_url(url: str) -> bool:
    return url.startswith(f"{SCHEME}://")


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelTarget:
        """Raises ``ValueError`` naming the part of the URL that is wrong."""
        parts = urlsplit(url)
        if parts.scheme != SCHEME:
            raise ValueError(f"redis URL {url!r}: expected {SCHEME}://")
        _, _, hosts = parts.netloc.rpartition("@")
        sentinels = tuple(_host_port(item, url) for item in hosts.split(",") if item)
        if not sentinels:
            raise ValueError(f"redis URL {url!r}: names no sentinel (host:port[,host:port...])")
        master_name = unquote(parts.path.strip("/"))
        if not master_name or "/" in master_name:
            raise ValueError(f"redis URL {url!r}: the path must be the master's name, e.g. /mymaster")
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        if unknown := set(query) - {"db", "sentinel_username", "sentinel_password"}:
            raise ValueError(f"redis URL {url!r}: unknown option(s) {', '.join(sorted(unknown))}")
        try:
            db = int(query.get("db", "0"))
        except ValueError:
            raise ValueError(f"redis URL {url!r}: db must be a number") from None
        return cls(
            sentinels=sentinels,
            master_name=master_name,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            sentinel_username=query.get("sentinel_username"),
            sentinel_password=query.get("sentinel_password"),
        )

    @property
    def options(self) -> dict[str, Any]:
        """The master's connection options in redis-py's ``parse_url`` form (no address)."""
        return {"username": self.username, "password": self.password, "db": self.db}

    def _sentinel_kwargs(self) -> dict[str, Any]:
        return {
            "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
            "username": self.sentinel_username,
            "password": self.sentinel_password,
        }

    async def resolve(self) -> tuple[str, int]:
        """Ask the sentinels, in order, for the master (one that none of them holds
        down); a fresh set of connections each time, as this runs only when a link
        (re)connects and a long-lived one would have to be owned and closed."""
        sentinel = Sentinel(self.sentinels, sentinel_kwargs=self._sentinel_kwargs())
        try:
            host, port = await sentinel.discover_master(self.master_name)
        finally:
            for client in sentinel.sentinels:
                await client.aclose()
        return str(host), int(port)

    def sync_client(self, **kwargs: Any) -> tuple[SyncRedis, Callable[[], None]]:
        """A redis-py client whose connections go to the master of the moment (redis-py's
        own Sentinel support), for the services' few reads outside the request path, and
        the function that closes it with its connections to the sentinels."""
        sentinel = SyncSentinel(list(self.sentinels), sentinel_kwargs=self._sentinel_kwargs())
        client: SyncRedis = sentinel.master_for(
            self.master_name, db=self.db, username=self.username, password=self.password, **kwargs
        )

        def close() -> None:
            client.close()
            for each in sentinel.sentinels:
                each.close()

        return client, close


def _host_port(item: str, url: str) -> tuple[str, int]:
    host, _, port = item.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"redis URL {url!r}: sentinel {item!r} must be host:port")
    return host.strip("[]"), int(port)


async def master_client(url: str, **kwargs: Any) -> AsyncRedis:
    """redis-py's asyncio client for any URL the services take; for ``redis+sentinel://``,
    on the master the sentinels name now (tools that read Redis's counters for a while,
    like the bench, not services that must follow a failover)."""
    if not is_sentinel_url(url):
        client: AsyncRedis = AsyncRedis.from_url(url, **kwargs)
        return client
    target = SentinelTarget.parse(url)
    host, port = await target.resolve()
    return AsyncRedis(host=host, port=port, **target.options, **kwargs)
