"""Every RPC, enumerated from the generated descriptors; a benign request for each, and the slots
(string, number, JSON, mask, time fields) where hostile values go, with the values themselves."""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pytest
import strata
from google.protobuf import descriptor, duration_pb2, message, message_factory, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor

from gateway.routes import build_routes
from shared.api.callers import ADMIN_SCOPE, INTERNAL_SCOPE, OPERATOR_SCOPE
from shared.rpc.contract import required_scope
from tests.e2e.hostile.names import ATTACKER_MARK, DIMENSION, NAME

# What goes into every string slot (map and JSON keys, JSON values, field masks included).
HOSTILE_STRINGS: tuple[str, ...] = (
    "'; DROP TABLE kv.entries; --",
    '" OR 1=1 --',
    "') OR ('1'='1",
    "\x00",
    "a\x00b",
    "%",
    "_",
    "\\",
    "$1",
    "*?[a-z]",  # Redis glob (cache invalidation SCANs by prefix)
    "{p,q}",  # a Postgres array / jsonb path literal
    "strata_branch_x; DROP DATABASE strata; --",
    "../../etc/passwd",
    "\u202e\u200b\ufeff",  # bidi override, zero-width space, byte order mark
    "\U0001f600e\u0301\ufffe\uffff",  # astral plane, combining mark, noncharacters
    "'" * 70_000,  # long, and nothing but quotes
)


# -- the RPCs, from the generated descriptors ---------------------------------------

# The internal services, by the process that serves them (the gateway routes none).
INTERNAL_SERVED_BY = {
    "strata.internal.v1.ApiKeyAuthService": "admin",
    "strata.internal.v1.TenantPurgeService": "kv",
}


def _proto_services() -> list[descriptor.ServiceDescriptor]:
    """Every service declared by a generated ``strata.*`` module."""
    found: dict[str, descriptor.ServiceDescriptor] = {}
    for module in pkgutil.walk_packages(strata.__path__, "strata."):
        if module.name.endswith("_pb2"):
            for service in importlib.import_module(module.name).DESCRIPTOR.services_by_name.values():
                found[service.full_name] = service
    return [found[name] for name in sorted(found)]


@dataclass(frozen=True)
class Rpc:
    """One method of one service."""

    service: descriptor.ServiceDescriptor
    method: descriptor.MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.service.full_name}/{self.method.name}"

    @property
    def upstream(self) -> str:
        """The process serving it: ``strata.<upstream>.v1.<Service>``, or for an internal service the
        process that serves it."""
        return INTERNAL_SERVED_BY.get(self.service.full_name) or self.service.full_name.split(".")[1]

    @property
    def scope(self) -> str:
        """The scope the method declares."""
        return required_scope(self.method)

    @property
    def routed(self) -> bool:
        """Whether the gateway serves it (every public method; no internal one)."""
        return self.path in ROUTES

    @property
    def id(self) -> str:
        return f"{self.service.name}.{self.method.name}"

    @property
    def tenant_scoped(self) -> bool:
        """Whether it acts on the caller's own tenant (not an operator's whole-system call)."""
        return self.scope not in (ADMIN_SCOPE, OPERATOR_SCOPE, INTERNAL_SCOPE)

    def response(self, raw: bytes) -> message.Message:
        return message_factory.GetMessageClass(self.method.output_type).FromString(raw)


ROUTES = build_routes()
RPCS = [Rpc(service, method) for service in _proto_services() for method in service.methods]
BY_ID = {rpc.id: rpc for rpc in RPCS}
# One cheap call per upstream, to see that a key works (or is refused) everywhere.
PROBES = (
    "KvService.List",
    "RecordService.ListRecords",
    "VectorService.ListCollections",
    "ApiKeyService.ListApiKeys",
)
LIST_RPCS = [rpc for rpc in RPCS if "page_token" in rpc.method.input_type.fields_by_name]


def params(rpcs: Sequence[Rpc], bugs: dict[str, str] | None = None) -> list[Any]:
    """Test parameters, one per RPC; known bugs marked xfail(strict) with their write-up."""
    bugs = bugs or {}
    return [
        pytest.param(rpc, id=rpc.id, marks=[pytest.mark.xfail(strict=True, reason=bugs[rpc.id])])
        if rpc.id in bugs
        else pytest.param(rpc, id=rpc.id)
        for rpc in rpcs
    ]


# -- requests: a benign one per method, and the slots hostile values go into ----------

# A value that passes validation, by field name ("Message.field" first): the
# attacker's own names, so a hostile value in one field meets valid ones in the
# others and travels as far into the service as it can. None: leave unset.
_BENIGN_STRINGS: dict[str, str | None] = {
    "namespace": NAME,
    "key": NAME,
    "keys": NAME,
    "collection": NAME,
    "slug": NAME,
    "tenant": NAME,
    "name": NAME,
    "id": NAME,
    "ids": NAME,
    "database": NAME,
    "group": NAME,
    "path": "p",
    "text": "hello",
    "service": "kv",
    "scopes": "kv:read",
    # Tenants are named by slug here (their ids are UUIDs); index names are output only.
    "Tenant.id": None,
    "GetTenantRequest.id": None,
    "DeleteTenantRequest.id": None,
    "RecordIndex.name": None,
}
# Requests that need more than field defaults to get past their first check.
_OVERRIDES: dict[str, Callable[[Any], None]] = {
    "TenantService.UpdateTenant": lambda r: r.update_mask.paths.extend(["display_name", "plan", "metadata"]),
}
MAX_DEPTH = 3  # message nesting the walk follows (Filter.condition.path is at 3)


def is_map(f: FieldDescriptor) -> bool:
    return f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _fill(msg: message.Message, depth: int) -> None:
    """Set ``msg``'s fields to benign values (one member per oneof)."""
    taken: set[str] = set()
    for f in msg.DESCRIPTOR.fields:
        oneof = f.containing_oneof
        if oneof is not None and oneof.name in taken:
            continue
        if _fill_field(msg, f, depth) and oneof is not None:
            taken.add(oneof.name)


def _fill_field(msg: message.Message, f: FieldDescriptor, depth: int) -> bool:
    container = getattr(msg, f.name)
    if f.type == FieldDescriptor.TYPE_STRING:
        value = _BENIGN_STRINGS.get(f"{msg.DESCRIPTOR.name}.{f.name}", _BENIGN_STRINGS.get(f.name))
        if value is None:
            return False
        container.append(value) if f.is_repeated else setattr(msg, f.name, value)
        return True
    if f.type == FieldDescriptor.TYPE_ENUM and 1 in f.enum_type.values_by_number:
        container.append(1) if f.is_repeated else setattr(msg, f.name, 1)
        return True
    if f.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64) and f.name == "dimension":
        setattr(msg, f.name, DIMENSION)
        return True
    if f.type == FieldDescriptor.TYPE_FLOAT and f.is_repeated:  # a vector
        container.extend([1.0, 0.5][:DIMENSION])
        return True
    if f.type != FieldDescriptor.TYPE_MESSAGE or is_map(f):
        return False
    kind = f.message_type.full_name
    if kind == "google.protobuf.Struct" and not f.is_repeated:
        container.update({"p": "x", "owner": ATTACKER_MARK})
        return True
    if kind == "google.protobuf.Value" and not f.is_repeated:
        container.string_value = "x"
        return True
    if kind.startswith("google.protobuf.") or depth >= MAX_DEPTH:
        return False  # times, durations and masks stay unset
    sub = container.add() if f.is_repeated else container
    _fill(sub, depth + 1)
    sub.SetInParent()
    return True


def request_for(rpc: Rpc) -> message.Message:
    """A request of ``rpc`` that passes validation, acting on the attacker's own things."""
    request = message_factory.GetMessageClass(rpc.method.input_type)()
    _fill(request, 0)
    if rpc.id in _OVERRIDES:
        _OVERRIDES[rpc.id](request)
    return request


SlotKind = Literal["string", "struct_key", "struct_value", "value", "mask", "number", "timestamp", "duration"]
_NUMBERS = {
    FieldDescriptor.TYPE_INT32: (-1, 2**31 - 1, -(2**31)),
    FieldDescriptor.TYPE_SINT32: (-1, 2**31 - 1, -(2**31)),
    FieldDescriptor.TYPE_SFIXED32: (-1, 2**31 - 1, -(2**31)),
    FieldDescriptor.TYPE_INT64: (-1, 2**63 - 1, -(2**63)),
    FieldDescriptor.TYPE_SINT64: (-1, 2**63 - 1, -(2**63)),
    FieldDescriptor.TYPE_SFIXED64: (-1, 2**63 - 1, -(2**63)),
    FieldDescriptor.TYPE_UINT32: (2**32 - 1,),
    FieldDescriptor.TYPE_FIXED32: (2**32 - 1,),
    FieldDescriptor.TYPE_UINT64: (2**64 - 1,),
    FieldDescriptor.TYPE_FIXED64: (2**64 - 1,),
    FieldDescriptor.TYPE_FLOAT: (math.nan, math.inf, -math.inf, 3.4e38),
    FieldDescriptor.TYPE_DOUBLE: (math.nan, math.inf, -math.inf, 1.7e308, 5e-324),
    FieldDescriptor.TYPE_ENUM: (999, -7),  # proto3 enums are open: unknown numbers arrive as they are
}
_TIMESTAMPS = (
    timestamp_pb2.Timestamp(seconds=2**63 - 1),
    timestamp_pb2.Timestamp(seconds=-(2**63)),
    timestamp_pb2.Timestamp(seconds=253_402_300_800),  # year 10000
    timestamp_pb2.Timestamp(nanos=-1),
)
_DURATIONS = (
    duration_pb2.Duration(seconds=2**63 - 1),
    duration_pb2.Duration(seconds=-(2**63)),
    duration_pb2.Duration(seconds=1, nanos=-5),  # signs disagree
    duration_pb2.Duration(nanos=2 * 10**9),
)


@dataclass(frozen=True)
class Slot:
    """A place in a request where a hostile value can go: a field path and what it holds."""

    path: tuple[str, ...]
    kind: SlotKind
    number_type: int = 0  # FieldDescriptor.TYPE_* of a "number" slot

    @property
    def values(self) -> tuple[Any, ...]:
        """The hostile values for this slot."""
        if self.kind == "number":
            return _NUMBERS[self.number_type]
        if self.kind == "timestamp":
            return _TIMESTAMPS
        if self.kind == "duration":
            return _DURATIONS
        return HOSTILE_STRINGS


def slots(desc: descriptor.Descriptor, prefix: tuple[str, ...] = (), depth: int = 0) -> Iterator[Slot]:
    """Every string and number field of ``desc``, nested messages followed ``MAX_DEPTH`` deep."""
    for f in desc.fields:
        path = (*prefix, f.name)
        if f.type == FieldDescriptor.TYPE_STRING:
            yield Slot(path, "string")
        elif f.type in _NUMBERS:
            yield Slot(path, "number", f.type)
        elif f.type == FieldDescriptor.TYPE_MESSAGE and not is_map(f):
            kind = f.message_type.full_name
            if kind == "google.protobuf.Struct":
                yield Slot(path, "struct_key")
                yield Slot(path, "struct_value")
            elif kind == "google.protobuf.Value":
                if not f.is_repeated:
                    yield Slot(path, "value")
            elif kind == "google.protobuf.FieldMask":
                yield Slot(path, "mask")
            elif kind == "google.protobuf.Timestamp":
                yield Slot(path, "timestamp")
            elif kind == "google.protobuf.Duration":
                yield Slot(path, "duration")
            elif not kind.startswith("google.protobuf.") and depth < MAX_DEPTH:
                yield from slots(f.message_type, path, depth + 1)


def _container(request: message.Message, path: Sequence[str]) -> message.Message:
    """The message holding the field at ``path``, made present (and benign) on the way."""
    current = request
    for depth, name in enumerate(path, start=1):
        f = current.DESCRIPTOR.fields_by_name[name]
        if f.is_repeated:
            items = getattr(current, name)
            if not items:
                _fill(items.add(), depth)
            current = items[0]
        else:
            present = current.HasField(name)
            current = getattr(current, name)
            if not present:
                _fill(current, depth)
                current.SetInParent()
    return current


def with_value(rpc: Rpc, slot: Slot, value: Any) -> message.Message:
    """``request_for(rpc)`` with ``value`` at ``slot`` (other members of its oneof cleared)."""
    request = request_for(rpc)
    holder = _container(request, slot.path[:-1])
    name = slot.path[-1]
    f = holder.DESCRIPTOR.fields_by_name[name]
    target = getattr(holder, name)
    if slot.kind in ("string", "number"):
        if f.is_repeated:
            del target[:]
            target.extend([value] * (DIMENSION if f.type == FieldDescriptor.TYPE_FLOAT else 1))
        else:
            setattr(holder, name, value)
    elif slot.kind in ("struct_key", "struct_value"):
        target.Clear()
        target.update({value: "x"} if slot.kind == "struct_key" else {"p": value})
    elif slot.kind == "value":
        target.string_value = value
    elif slot.kind == "mask":
        target.paths[:] = [value]
    else:
        target.CopyFrom(value)
    return request
