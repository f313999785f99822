"""Wires the vector service into the shared server bootstrap."""

from __future__ import annotations

from strata.vector.v1 import vector_pb2

from services.vector.servicer import VectorServicer
from services.vector.store import VectorStore
from shared.api.pagetoken import PageTokens
from shared.config.settings import Settings, require_internal_secret
from shared.rpc.server import StrataServer, run_service
from shared.storage.service_db import open_service_database

__all__ = ["build_vector_server", "main"]

SERVICE = vector_pb2.DESCRIPTOR.services_by_name["VectorService"]


async def build_vector_server(settings: Settings) -> StrataServer:
    """A ready-to-start vector server on ``settings``' database."""
    db = await open_service_database(settings, "vector")
    server = StrataServer(settings, "vector")
    server.report("pool", db.pool_stats)
    server.add_servicer(
        VectorServicer(
            VectorStore(db), PageTokens(require_internal_secret(settings)), settings.max_message_bytes
        ),
        SERVICE,
    )
    server.after_drain(db.close)
    return server


def main() -> None:
    """Entry point of the vector process."""
    run_service("vector", build_vector_server)
