"""System shared memory, as Triton's extension: regions a client on the gateway's host
registers, inputs read from them and outputs written into them.

A region is a POSIX shared memory object (``/dev/shm/<key>``) the client created;
the gateway maps it when it is registered and unmaps it when it is unregistered. It
must therefore be on the gateway's host, readable and writable by the gateway's user.

Regions are per tenant: a tenant registers, lists, uses and unregisters only its own,
under names of its choosing (two tenants may use the same name). A tenant may map
only keys that start with its ``shared_memory.key_prefix`` (tenants file), and the
open development tenant any key. The key is opened without following a symlink and
must be a regular file with one link, so a prefix cannot be used to reach another
tenant's region under a name of one's own. Offsets and sizes are checked against the
region before any byte is read or written.

An input in a region travels as a view of the mapping into the same path as
``raw_input_contents`` (no copy before the queue's own); an output requested into a
region is written there, and the response carries its name, datatype and shape but
no bytes, after the outputs that do carry bytes.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshserve.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from meshserve.tenancy.tenants import Tenant
from meshserve.wire.codec import encode_infer_response
from protos import grpc_service_pb2 as pb
from protos import meshserve_pb2 as mpb

SHM_ROOT = Path("/dev/shm")
MAX_REGIONS_PER_TENANT = 64
"""Each region holds a mapping for as long as it is registered."""

REGION_PARAMETER = "shared_memory_region"
OFFSET_PARAMETER = "shared_memory_offset"
BYTE_SIZE_PARAMETER = "shared_memory_byte_size"

_KEY = re.compile(r"/?[A-Za-z0-9._-]{1,255}")


@dataclass(frozen=True, slots=True)
class Region:
    """One registered region: ``byte_size`` bytes from ``offset`` of the object ``key``.
    ``view`` covers exactly those bytes."""

    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap
    view: memoryview

    def slice(self, what: str, offset: int, byte_size: int) -> memoryview:
        """``byte_size`` bytes from ``offset`` (within the region); InvalidArgument
        naming ``what`` when they do not lie inside it."""
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidArgument(
                f"{what}: {OFFSET_PARAMETER} {offset} and {BYTE_SIZE_PARAMETER} {byte_size} do not lie inside "
                f"shared memory region '{self.name}' of {self.byte_size} bytes"
            )
        return self.view[offset : offset + byte_size]

    def close(self) -> None:
        """Unmap, unless a request still holds a view (then the mapping goes with its last view)."""
        try:
            self.view.release()
            self.mapping.close()
        except BufferError:
            pass


@dataclass(frozen=True, slots=True)
class SharedMemoryCall:
    """A ModelInfer request's use of shared memory: ``raw`` is every input's bytes in
    order (regions' views and the raw contents sent); ``targets`` the outputs to write
    into regions, by name."""

    raw: list[memoryview] | None
    targets: dict[str, memoryview]

    def encode(
        self, reply: mpb.InferReply, data: Sequence[bytes | memoryview], model_name: str, request_id: str
    ) -> bytes:
        """The response: each target output written into its region (InvalidArgument
        when it does not fit), the others' bytes in the response as usual."""
        if not self.targets:
            return encode_infer_response(reply, data, model_name, request_id)
        kept = mpb.InferReply(version=reply.version)
        kept_data: list[bytes | memoryview] = []
        written = pb.ModelInferResponse()
        for index, tensor in enumerate(reply.outputs):
            raw = data[index] if data else tensor.data
            target = self.targets.get(tensor.name)
            if target is None:
                kept.outputs.append(tensor)
                kept_data.append(raw)
                continue
            if len(raw) > len(target):
                raise InvalidArgument(
                    f"output '{tensor.name}': {BYTE_SIZE_PARAMETER} {len(target)} is too small for the "
                    f"{len(raw)} bytes of the result"
                )
            target[: len(raw)] = raw
            written.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        # Repeated fields of concatenated encodings append: the written outputs follow
        # the others, so raw_output_contents stay aligned with the first outputs.
        return encode_infer_response(kept, kept_data, model_name, request_id) + written.SerializeToString()


class SharedMemoryRegistry:
    """The regions registered through this gateway, per tenant. Not shared between
    gateway processes: a client registers with the gateway it sends requests to."""

    def __init__(self, root: Path = SHM_ROOT) -> None:
        self._root = root
        self._regions: dict[tuple[str, str], Region] = {}

    def register(self, tenant: Tenant, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map ``byte_size`` bytes from ``offset`` of ``key`` as the tenant's region ``name``."""
        prefix = _allowed_prefix(tenant)
        if not name:
            raise InvalidArgument("SystemSharedMemoryRegister: 'name' is empty")
        if (tenant.name, name) in self._regions:
            raise InvalidArgument(f"shared memory region '{name}' is already registered; unregister it first")
        if not _KEY.fullmatch(key) or key.lstrip("/") in (".", ".."):
            raise InvalidArgument(f"shared memory key {key!r} is not a POSIX shared memory name like '/name'")
        if not key.startswith(prefix):
            raise PermissionDenied(f"shared memory key {key!r} does not start with this tenant's key_prefix {prefix!r}")
        if byte_size <= 0:
            raise InvalidArgument(f"shared memory region '{name}': byte_size must be > 0")
        if sum(1 for owner, _ in self._regions if owner == tenant.name) >= MAX_REGIONS_PER_TENANT:
            raise ResourceExhausted(
                f"a tenant may register at most {MAX_REGIONS_PER_TENANT} shared memory regions", reason="shared_memory"
            )
        mapping = self._map(name, key, offset + byte_size)
        view = memoryview(mapping)[offset:]
        self._regions[tenant.name, name] = Region(name, key, offset, byte_size, mapping, view)

    def unregister(self, tenant: Tenant, name: str) -> None:
        """Unmap the tenant's region ``name`` (an unknown name: nothing to do), or all
        of its regions when ``name`` is empty."""
        names = [name] if name else [n for owner, n in self._regions if owner == tenant.name]
        for each in names:
            region = self._regions.pop((tenant.name, each), None)
            if region is not None:
                region.close()

    def status(self, tenant: Tenant, name: str) -> list[Region]:
        """The tenant's region ``name`` (NotFound when it has none by that name), or
        all of its regions when ``name`` is empty."""
        if name:
            region = self._regions.get((tenant.name, name))
            if region is None:
                raise NotFound(f"no shared memory region '{name}' is registered")
            return [region]
        return [region for (owner, _), region in sorted(self._regions.items()) if owner == tenant.name]

    def plan(
        self, tenant: Tenant, request: pb.ModelInferRequest, raw: Sequence[bytes | memoryview] | None
    ) -> SharedMemoryCall | None:
        """The request's inputs and outputs in regions; None when it names none (the
        common case: a few dictionary lookups). ``raw``: the raw contents read in
        place, None when they are in the message."""
        in_region = [REGION_PARAMETER in tensor.parameters for tensor in request.inputs]
        targets = {
            out.name: self._slice(tenant, f"output '{out.name}'", out.parameters)
            for out in request.outputs
            if REGION_PARAMETER in out.parameters
        }
        if not any(in_region):
            return SharedMemoryCall(None, targets) if targets else None
        sent = list(request.raw_input_contents if raw is None else raw)
        if len(sent) != in_region.count(False):
            raise InvalidArgument(
                f"raw_input_contents has {len(sent)} entries for {in_region.count(False)} inputs not in shared "
                "memory; with an input in shared memory, send each other input in raw_input_contents, in order"
            )
        contents = iter(sent)
        views = [
            self._slice(tenant, f"input '{tensor.name}'", tensor.parameters) if shared else memoryview(next(contents))
            for tensor, shared in zip(request.inputs, in_region, strict=True)
        ]
        return SharedMemoryCall(views, targets)

    def _slice(self, tenant: Tenant, what: str, params: Mapping[str, pb.InferParameter]) -> memoryview:
        name = params[REGION_PARAMETER].string_param
        region = self._regions.get((tenant.name, name))
        if region is None:
            raise InvalidArgument(f"{what}: no shared memory region '{name}' is registered")
        if not region.key.startswith(_allowed_prefix(tenant)):  # the tenants file changed since
            raise PermissionDenied(f"{what}: region '{name}' is outside this tenant's shared memory key_prefix now")
        offset = _integer(params.get(OFFSET_PARAMETER))
        if BYTE_SIZE_PARAMETER not in params:
            raise InvalidArgument(f"{what}: '{BYTE_SIZE_PARAMETER}' is required with '{REGION_PARAMETER}'")
        return region.slice(what, offset, _integer(params[BYTE_SIZE_PARAMETER]))

    def _map(self, name: str, key: str, length: int) -> mmap.mmap:
        """Map the first ``length`` bytes of ``<root>/<key>``: a regular file with one link, no symlink."""
        path = self._root / key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidArgument(
                f"shared memory region '{name}': cannot open key {key!r} on the gateway's host ({exc.strerror}); "
                "system shared memory works only with a client on the same host as the gateway"
            ) from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise InvalidArgument(f"shared memory region '{name}': key {key!r} is not a plain shared memory object")
            if info.st_size < length:
                raise InvalidArgument(
                    f"shared memory region '{name}': offset and byte_size need {length} bytes, "
                    f"key {key!r} has {info.st_size}"
                )
            return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)


def region_status(regions: Sequence[Region]) -> pb.SystemSharedMemoryStatusResponse:
    status = pb.SystemSharedMemoryStatusResponse.RegionStatus
    return pb.SystemSharedMemoryStatusResponse(
        regions={r.name: status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size) for r in regions}
    )


def _allowed_prefix(tenant: Tenant) -> str:
    if tenant.shared_memory_prefix is None:
        raise PermissionDenied(
            f"tenant '{tenant.name}' may not use shared memory (tenants file: 'shared_memory: "
            "{allowed: true, key_prefix: ...}')"
        )
    return tenant.shared_memory_prefix


def _integer(param: pb.InferParameter | None) -> int:
    """An int64 or uint64 parameter's value (tritonclient sends int64); 0 when absent."""
    if param is None:
        return 0
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"shared memory parameters are integers, got {kind}")
    return int(getattr(param, kind))
