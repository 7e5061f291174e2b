"""``meshserve models split NAME 1=95 2=5``: change a model's traffic split at run time.

Calls the gateway's ``Admin.SetTrafficSplit`` (a tenant with ``admin: true``), which
the router applies and every gateway follows with its next routing table. No
weights: back to the split in the model's config.yaml (or none: the latest ready
version). The override lasts until the router restarts; keep
config.yaml in step for anything meant to stay (docs/lifecycle.md)::

    meshserve models split resnet 1=95 2=5 --sticky-by user
    meshserve models split resnet 1=100 --shadow 2:0.1
    meshserve models split resnet                  # back to config.yaml
"""

from __future__ import annotations

import argparse
from typing import Any

from protos import meshserve_pb2 as mpb


def add_split_parser(models: Any) -> None:
    """Add ``split`` to the ``models`` subcommands (``models``: argparse's subparsers action)."""
    parser = models.add_parser("split", help="set a model's traffic split between its versions (an admin's call)")
    parser.add_argument("name", help="the model")
    parser.add_argument("weights", nargs="*", metavar="VERSION=WEIGHT", help="e.g. 1=95 2=5; none: back to config.yaml")
    parser.add_argument("--sticky-by", default="", help="a request parameter or header: one caller, one version")
    parser.add_argument(
        "--shadow", default="", metavar="VERSION:SHARE", help="copy SHARE (0..1) of requests to VERSION"
    )


def split_request(args: argparse.Namespace) -> mpb.TrafficSplit:
    """The SetTrafficSplit message of the command line; ValueError naming the bad argument."""
    weights: dict[int, int] = {}
    for item in args.weights:
        version, sep, weight = item.partition("=")
        if not sep or not version.isdigit() or not weight.isdigit():
            raise ValueError(f"weight {item!r}: expected VERSION=WEIGHT with whole numbers, e.g. 2=5")
        weights[int(version)] = int(weight)
    split = mpb.TrafficSplit(model=args.name, weights=weights, sticky_by=args.sticky_by)
    if args.shadow:
        version, sep, share = args.shadow.partition(":")
        try:
            split.shadow_version, split.shadow_share = int(version), float(share)
        except ValueError:
            raise ValueError(f"--shadow {args.shadow!r}: expected VERSION:SHARE, e.g. 2:0.1") from None
        if not sep:
            raise ValueError(f"--shadow {args.shadow!r}: expected VERSION:SHARE, e.g. 2:0.1")
    return split


def render_split(split: mpb.TrafficSplit) -> str:
    """The split in force, in one line."""
    if not split.weights:
        return f"{split.model}: no split (requests naming no version go to the latest ready version)\n"
    total = sum(split.weights.values())
    shares = ", ".join(f"v{v} {w} ({w / total:.0%})" for v, w in sorted(split.weights.items()))
    sticky = f"; sticky by {split.sticky_by}" if split.sticky_by else ""
    shadow = f"; shadow {split.shadow_share:.0%} to v{split.shadow_version}" if split.shadow_version else ""
    return f"{split.model}: {shares}{sticky}{shadow}\n"
