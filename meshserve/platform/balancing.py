"""How gateways and workers dial the router: only a router whose health ``""`` is
SERVING gets their calls.

With leader election (router/leader.py) several routers run and only the leader is
SERVING. The router address may then name all of them (Kubernetes: the headless
Service, ``dns:///meshserve-router-headless.<ns>.svc:8003``), and the channel
balances over the addresses with gRPC's client-side health checking: a follower's
connection stays up but is never chosen, and the new leader is chosen as soon as
its health turns SERVING. With one router (``meshserve up``) this changes nothing
while it runs; while it stops (NOT_SERVING) calls fail at once as UNAVAILABLE.
"""

from __future__ import annotations

import json

ROUTER_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
}

ROUTER_CHANNEL_OPTIONS = (("grpc.service_config", json.dumps(ROUTER_SERVICE_CONFIG)),)
"""Channel options for every channel to the router."""
