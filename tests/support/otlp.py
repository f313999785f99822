"""A real OTLP/gRPC trace receiver for tests: the collector's TraceService, keeping spans in memory."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class ReceivedSpan:
    """One exported span, flattened."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    status_code: int


@dataclass
class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    spans: list[ReceivedSpan] = field(default_factory=list)
    port: int = 0

    async def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                "",
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status_code=span.status.code,
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, predicate, timeout: float = 15.0) -> list[ReceivedSpan]:
        """Spans once ``predicate(spans)`` holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.spans):
            if loop.time() > deadline:
                raise AssertionError(f"spans never matched; got {[(s.service, s.name) for s in self.spans]}")
            await asyncio.sleep(0.1)
        return self.spans


def _value(value) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


async def start_receiver() -> tuple[grpc.aio.Server, TraceReceiver]:
    receiver = TraceReceiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, receiver
