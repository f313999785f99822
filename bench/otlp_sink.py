"""An OTLP/gRPC trace receiver that counts and discards: where traced runs export to."""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

__all__ = ["OtlpSink"]

_EXPORT = "Export"
_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


class OtlpSink:
    """Accepts ExportTraceServiceRequest calls on a free port; counts requests and spans."""

    def __init__(self) -> None:
        self.requests = 0
        self.spans = 0
        self.port = 0
        self._server = grpc.aio.server()

    async def start(self) -> int:
        """Start on 127.0.0.1 and return the port."""

        async def export(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
            self.requests += 1
            self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse().SerializeToString()

        handler = grpc.method_handlers_generic_handler(
            _SERVICE, {_EXPORT: grpc.unary_unary_rpc_method_handler(export)}
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self.port

    async def stop(self) -> None:
        await self._server.stop(None)

    def environment(self) -> dict[str, str]:
        """OTEL_* settings that make every process trace every call and export here."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_TRACES_SAMPLER": "always_on",
        }
