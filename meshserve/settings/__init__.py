"""Each service's frozen settings (:mod:`.services`) and the command line made from them (:mod:`.flags`).

Every setting has a command-line flag and a ``MESHSERVE_<NAME>`` environment
variable, both made from its one declaration; the flag wins. Nothing here reads
the environment at import time.
"""

from meshserve.settings.flags import (
    ENV_PREFIX,
    Option,
    add_arguments,
    cli,
    env_default,
    forwarded_flags,
    from_args,
    options,
    parse_bool,
    tls_cli,
    tls_from_args,
)
from meshserve.settings.services import (
    ANY_HOST,
    LOOPBACK_HOST,
    TRACE_TENANT_MODES,
    GatewaySettings,
    LogSettings,
    RouterSettings,
    WorkerSettings,
    gateway_host,
    instance_id,
)

__all__ = [
    "ANY_HOST",
    "ENV_PREFIX",
    "LOOPBACK_HOST",
    "TRACE_TENANT_MODES",
    "GatewaySettings",
    "LogSettings",
    "Option",
    "RouterSettings",
    "WorkerSettings",
    "add_arguments",
    "cli",
    "env_default",
    "forwarded_flags",
    "from_args",
    "gateway_host",
    "instance_id",
    "options",
    "parse_bool",
    "tls_cli",
    "tls_from_args",
]
