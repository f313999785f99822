"""Wires the KV service into the shared server bootstrap."""

from __future__ import annotations

from strata.internal.v1 import internal_pb2
from strata.kv.v1 import kv_pb2

from services.kv.keyspace import Limits
from services.kv.publisher import WritePublisher
from services.kv.revisions import RevisionFeed
from services.kv.servicer import KvServicer
from services.kv.store import KvStore
from services.kv.sweeper import Sweeper
from shared.api.pagetoken import PageTokens
from shared.cache.revisioned import RevisionedCache
from shared.config.settings import Settings, require_internal_secret
from shared.rpc.server import StrataServer, run_service
from shared.storage.service_db import open_service_database

__all__ = ["build_kv_server", "main"]

SERVICE = kv_pb2.DESCRIPTOR.services_by_name["KvService"]
PURGE_SERVICE = internal_pb2.DESCRIPTOR.services_by_name["TenantPurgeService"]


async def build_kv_server(settings: Settings) -> StrataServer:
    """A ready-to-start KV server on ``settings``' database and Redis."""
    db = await open_service_database(settings, "kv")
    cache = RevisionedCache.for_service(settings, "kv")
    feed = RevisionFeed(settings.database_url)
    feed.start()
    publisher = WritePublisher(cache, feed)
    store = KvStore(db, publisher)
    sweeper = Sweeper(
        store, feed, interval_s=settings.kv_sweep_interval_s, keep_revisions=settings.kv_history_revisions
    )
    sweeper.start()
    server = StrataServer(settings, "kv")
    server.report("pool", db.pool_stats)
    server.report("cache", cache.snapshot)
    server.report("group_commit", store.group_commit_stats)
    servicer = KvServicer(
        store, cache, publisher, feed, Limits(settings), PageTokens(require_internal_secret(settings))
    )
    server.add_servicer(servicer, SERVICE)
    server.add_servicer(servicer, PURGE_SERVICE)  # a purge deletes keys as Delete does, published alike
    # Watch streams end first (clients resume elsewhere), then in-flight calls drain.
    server.on_shutdown(feed.close)
    server.on_shutdown(sweeper.close)
    server.after_drain(cache.close)
    server.after_drain(db.close)
    return server


def main() -> None:
    """Entry point of the KV process."""
    run_service("kv", build_kv_server)
