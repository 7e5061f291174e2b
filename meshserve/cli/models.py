"""``meshserve models list|load|unload``: the Triton repository API from the shell.

Calls the gateway's ``RepositoryIndex``, ``RepositoryModelLoad`` and
``RepositoryModelUnload`` (what tritonclient calls), with the tenant's API key:

    meshserve models list [--ready]
    meshserve models load NAME [--config FILE_OR_JSON] [--file 1/model.onnx=PATH ...]
    meshserve models unload NAME
    meshserve models stats [NAME] [--model-version N]
    meshserve models split NAME [1=95 2=5] [--sticky-by KEY] [--shadow 2:0.1]

Load and unload need a tenant marked ``admin: true`` (docs/tenants.md) and a router
in ``--model-control-mode explicit`` (docs/lifecycle.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc

from meshserve.cli.model_stats import format_table
from meshserve.cli.split import add_split_parser, render_split, split_request
from meshserve.platform.tls import TlsConfig, sync_channel
from meshserve.settings import add_arguments, from_args
from meshserve.settings.flags import cli, tls_cli
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import meshserve_pb2 as mpb
from protos import meshserve_pb2_grpc as mpb_grpc

HEADER = ("MODEL", "VERSION", "STATE", "REASON")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelsClientSettings:
    """Where ``meshserve models`` calls, and as whom."""

    address: str = field(default="127.0.0.1:8001", metadata=cli("the gateway's gRPC host:port", env="GATEWAY"))
    api_key: str = field(default="", repr=False, metadata=cli("the tenant's API key (sent as a bearer token)"))
    timeout_s: float = field(
        default=60.0, metadata=cli("longest wait for an answer (an unload drains first)", env="MODELS_TIMEOUT_S")
    )
    tls: TlsConfig | None = field(default=None, metadata=tls_cli("the gateway's port asks for a client certificate"))


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    """``models``' flags and its three subcommands."""
    add_arguments(parser, ModelsClientSettings)
    sub = parser.add_subparsers(dest="models_command", required=True)
    listing = sub.add_parser("list", help="every model and version with its state (RepositoryIndex)")
    listing.add_argument("--ready", action="store_true", help="only the versions that are ready")
    load = sub.add_parser("load", help="load or reload a model (RepositoryModelLoad)")
    load.add_argument("name")
    load.add_argument("--config", help="Triton's JSON model config overriding the directory's: a file, or the JSON")
    load.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="VERSION/NAME=PATH",
        help="a model file sent in the request, e.g. 1/model.onnx=./model.onnx (repeat for more)",
    )
    unload = sub.add_parser("unload", help="drain and unload a model (RepositoryModelUnload)")
    unload.add_argument("name")
    stats = sub.add_parser("stats", help="Triton's model statistics: counts and mean times (ModelStatistics)")
    stats.add_argument("name", nargs="?", default="", help="one model (default: every model the key may use)")
    stats.add_argument("--model-version", default="", help="one version of NAME (default: all)")
    add_split_parser(sub)


def run_models(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run one ``models`` subcommand (printing to ``out``, default standard output);
    1 with the gRPC status on stderr when refused, 2 for a bad argument."""
    out = out or sys.stdout
    settings = from_args(ModelsClientSettings, args)
    metadata = (("authorization", f"Bearer {settings.api_key}"),) if settings.api_key else ()
    try:
        request = _request(args)
    except (OSError, ValueError) as exc:
        print(f"meshserve models: {exc}", file=sys.stderr)
        return 2
    with sync_channel(settings.address, settings.tls) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            if isinstance(request, pb.RepositoryIndexRequest):
                index = stub.RepositoryIndex(request, metadata=metadata, timeout=settings.timeout_s)
                out.write(render_index(index))
            elif isinstance(request, mpb.TrafficSplit):
                split = mpb_grpc.AdminStub(channel).SetTrafficSplit(
                    request, metadata=metadata, timeout=settings.timeout_s
                )
                out.write(render_split(split))
            elif isinstance(request, pb.ModelStatisticsRequest):
                statistics = stub.ModelStatistics(request, metadata=metadata, timeout=settings.timeout_s)
                out.write(format_table(statistics) + "\n")
            elif isinstance(request, pb.RepositoryModelLoadRequest):
                stub.RepositoryModelLoad(request, metadata=metadata, timeout=settings.timeout_s)
                print(f"loaded {request.model_name}", file=out)
            else:
                stub.RepositoryModelUnload(request, metadata=metadata, timeout=settings.timeout_s)
                print(f"unloaded {request.model_name}", file=out)
        except grpc.RpcError as exc:
            print(f"meshserve models: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def _request(
    args: argparse.Namespace,
) -> (
    pb.RepositoryIndexRequest
    | pb.RepositoryModelLoadRequest
    | pb.RepositoryModelUnloadRequest
    | pb.ModelStatisticsRequest
    | mpb.TrafficSplit
):
    if args.models_command == "split":
        return split_request(args)
    if args.models_command == "stats":
        return pb.ModelStatisticsRequest(name=args.name, version=args.model_version)
    if args.models_command == "list":
        return pb.RepositoryIndexRequest(ready=args.ready)
    if args.models_command == "unload":
        return pb.RepositoryModelUnloadRequest(model_name=args.name)
    request = pb.RepositoryModelLoadRequest(model_name=args.name)
    if args.config is not None:
        text = args.config
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text(encoding="utf-8")
        request.parameters["config"].string_param = text
    for spec in args.file:
        target, sep, path = spec.partition("=")
        if not sep or not target or not path:
            raise ValueError(f"--file {spec!r}: expected VERSION/NAME=PATH, e.g. 1/model.onnx=./model.onnx")
        request.parameters[f"file:{target}"].bytes_param = Path(path).read_bytes()
    return request


def render_index(index: pb.RepositoryIndexResponse) -> str:
    """The index as a table, one version a line."""
    rows: Sequence[tuple[str, ...]] = [HEADER, *((m.name, m.version or "-", m.state, m.reason) for m in index.models)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]).rstrip() for row in rows
    ]
    return "\n".join(lines) + "\n"
