"""Admin's operations through the real gateway: health, statistics, caches, migrations, audit.

The stack is the launcher's (real processes on real Postgres and Redis),
publishing process figures every 0.3 s (tests/support/stack.py).
"""

from __future__ import annotations

import json
import time
import uuid

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2
from strata.tenants.v1 import tenants_pb2

from shared.cache.redisclient import open_redis
from shared.storage.slowlog import SlowLog
from tests.support.calls import assert_invalid, bearer, rpc_error
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e


def key_id_of(api_key: str) -> str:
    return api_key.split("_")[1]


# -- health -------------------------------------------------------------------


async def test_system_health_is_serving_with_every_part_checked(gw_admin, admin_metadata):
    async def healthy():
        reply = await gw_admin.GetSystemHealth(admin_pb2.GetSystemHealthRequest(), metadata=admin_metadata)
        published = {p.component for p in reply.processes}
        return reply if {"kv", "tenants", "vector", "admin", "gateway"} <= published else None

    health = await eventually(healthy)
    assert health, "every process publishes its figures"
    assert health.status == admin_pb2.SERVING_STATUS_SERVING, list(health.reasons)
    assert not health.reasons
    assert {c.component for c in health.components} == {"kv", "tenants", "vector", "admin", "gateway"}
    for component in health.components:
        assert component.status == admin_pb2.SERVING_STATUS_SERVING, component
        assert component.round_trip.ToNanoseconds() > 0
    assert health.postgres.reachable and health.postgres.version.startswith("18")
    assert health.postgres.round_trip.ToNanoseconds() > 0
    assert health.redis.reachable and health.redis.version
    versions = {m.schema: m for m in health.migrations}
    assert set(versions) == {"kv", "tenants", "vector", "admin"}
    assert all(m.applied_version == m.latest_version > 0 for m in versions.values()), versions
    kv = next(p for p in health.processes if p.component == "kv")
    assert kv.pool.max_size >= kv.pool.size >= 1 and kv.pool.waiters >= 0
    assert kv.HasField("cache") and kv.report_time.seconds > 0
    gateway = next(p for p in health.processes if p.component == "gateway")
    assert not gateway.HasField("pool")


# -- database statistics --------------------------------------------------------


async def test_database_stats_report_sizes_connections_and_index_health(gw_admin, admin_metadata, settings):
    owner = await asyncpg.connect(settings.migrate_database_url)
    try:
        # A redundant twin of an existing index, as a careless migration would add.
        await owner.execute("CREATE INDEX audit_twin ON admin.audit_log (action, id)")
        stats = await gw_admin.GetDatabaseStats(admin_pb2.GetDatabaseStatsRequest(), metadata=admin_metadata)
    finally:
        await owner.execute("DROP INDEX IF EXISTS admin.audit_twin")
        await owner.close()
    assert stats.database_bytes > 1_000_000
    tables = {(t.schema, t.table): t for t in stats.tables}
    assert {("kv", "entries"), ("tenants", "records"), ("vector", "points"), ("admin", "api_keys")} <= set(
        tables
    )
    assert all(t.total_bytes >= t.index_bytes >= 0 and 0 <= t.dead_ratio <= 1 for t in tables.values())
    indexes = {(i.schema, i.index): i for i in stats.indexes}
    assert indexes[("admin", "audit_twin")].duplicate_of == "audit_log_by_action"
    assert indexes[("admin", "audit_twin")].unused
    assert indexes[("admin", "audit_log_by_action")].duplicate_of == ""
    assert not indexes[("admin", "api_keys_pkey")].unused  # backs the primary key
    applications = {c.application for c in stats.connections}
    assert {"strata-kv", "strata-admin"} <= applications, applications
    assert sum(c.count for c in stats.connections) >= 4
    assert 0 < stats.cache_hit_ratio <= 1
    if not stats.statement_stats_available:
        assert not stats.slowest_statements
    error = await rpc_error(
        gw_admin.GetDatabaseStats(admin_pb2.GetDatabaseStatsRequest(limit=1001), metadata=admin_metadata)
    )
    assert_invalid(error, "limit")


async def test_slow_statements_reach_the_slow_query_log_with_their_trace(gw_admin, admin_metadata, settings):
    from shared.storage.db import Database

    marker = f"slow-{uuid.uuid4().hex[:8]}"
    db = await Database.open(
        settings.database_url, slow_query_ms=50, slow_log=SlowLog(open_redis(settings.redis_url), "probe")
    )
    try:
        await db.fetchval(f'SELECT pg_sleep(0.06) IS NULL AS "{marker}"')
        await db.fetchval(f'SELECT 1 AS "{marker}-fast"')
    finally:
        await db.close()

    async def logged():
        stats = await gw_admin.GetDatabaseStats(
            admin_pb2.GetDatabaseStatsRequest(limit=50), metadata=admin_metadata
        )
        return [q for q in stats.slow_queries if marker in q.statement]

    entries = await eventually(logged)
    assert len(entries) == 1, entries  # the fast statement is not logged
    entry = entries[0]
    assert entry.component == "probe" and "pg_sleep" in entry.statement
    assert entry.duration.ToMilliseconds() >= 50
    assert abs(entry.time.seconds - time.time()) < 60


# -- caches ---------------------------------------------------------------------


async def test_cache_stats_count_hits_and_invalidation_empties_the_selection(
    gw_admin, gw_kv, admin_metadata, namespace, settings, stack
):
    other = f"{namespace}-other"
    for ns in (namespace, other):
        await gw_kv.Put(kv_pb2.PutRequest(namespace=ns, key="k", value=b"v"), metadata=admin_metadata)
        for _ in range(3):
            got = await gw_kv.Get(kv_pb2.GetRequest(namespace=ns, key="k"), metadata=admin_metadata)
            assert got.kv.value == b"v"

    async def kv_counters():
        stats = await gw_admin.GetCacheStats(admin_pb2.GetCacheStatsRequest(), metadata=admin_metadata)
        # This stack's kv: other stacks of the run share the Redis its figures are published to.
        own = f":{stack.launched.pids()['kv']}"
        found = [p.cache for p in stats.processes if p.component == "kv" and p.instance.endswith(own)]
        return found if found and found[0].local_hits + found[0].redis_hits > 0 else None

    counters = await eventually(kv_counters)
    assert counters, "the kv process publishes its cache counters"
    assert 0 < counters[0].hit_ratio <= 1 and counters[0].local_entries >= 2
    stats = await gw_admin.GetCacheStats(admin_pb2.GetCacheStatsRequest(), metadata=admin_metadata)
    assert {p.component for p in stats.processes} == {"kv", "tenants"}  # the processes that cache

    before = counters[0].invalidations_received

    redis = open_redis(settings.redis_url)
    try:

        def cached(ns: str):
            return redis.keys(b"strata:cache:kv:dev\x00" + ns.encode() + b"\x00*")

        assert await cached(namespace) and await cached(other)
        reply = await gw_admin.InvalidateCache(
            admin_pb2.InvalidateCacheRequest(service="kv", tenant="dev", group=namespace),
            metadata=admin_metadata,
        )
        assert reply.redis_entries_removed >= 1
        assert not await cached(namespace)
        assert await cached(other), "only the selected namespace is dropped"
    finally:
        await redis.aclose()

    async def dropped_locally():
        found = await kv_counters()
        return found and found[0].invalidations_received > before

    assert await eventually(dropped_locally), "the kv process dropped its local entries"
    got = await gw_kv.Get(kv_pb2.GetRequest(namespace=namespace, key="k"), metadata=admin_metadata)
    assert got.kv.value == b"v"  # read again from Postgres


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"service": "vector"}, "service"),
        ({"service": ""}, "service"),
        ({"service": "kv", "tenant": "Not A Slug"}, "tenant"),
        ({"service": "kv", "group": "ns"}, "group"),
        ({"service": "kv", "tenant": "dev", "key_prefix": "k"}, "key_prefix"),
        ({"service": "kv", "tenant": "dev", "group": "a\x00b"}, "group"),
        ({"service": "tenants", "tenant": "dev", "group": "c", "key_prefix": "x" * 5000}, "key_prefix"),
    ],
)
async def test_invalidate_cache_refuses_bad_selections(gw_admin, admin_metadata, request_fields, field):
    error = await rpc_error(
        gw_admin.InvalidateCache(admin_pb2.InvalidateCacheRequest(**request_fields), metadata=admin_metadata)
    )
    assert_invalid(error, field)


async def test_a_wildcard_in_a_prefix_is_matched_literally(
    gw_admin, gw_kv, admin_metadata, namespace, settings
):
    await gw_kv.Put(kv_pb2.PutRequest(namespace=namespace, key="a*1", value=b"1"), metadata=admin_metadata)
    await gw_kv.Put(kv_pb2.PutRequest(namespace=namespace, key="ab", value=b"2"), metadata=admin_metadata)
    for key in ("a*1", "ab"):
        await gw_kv.Get(kv_pb2.GetRequest(namespace=namespace, key=key), metadata=admin_metadata)
    redis = open_redis(settings.redis_url)
    try:
        await gw_admin.InvalidateCache(
            admin_pb2.InvalidateCacheRequest(service="kv", tenant="dev", group=namespace, key_prefix="a*"),
            metadata=admin_metadata,
        )
        left = await redis.keys(b"strata:cache:kv:dev\x00" + namespace.encode() + b"\x00*")
    finally:
        await redis.aclose()
    assert [k.rsplit(b"\x00", 1)[1] for k in left] == [b"ab"]


# -- migrations -------------------------------------------------------------------


async def test_migration_status_lists_applied_files_and_apply_is_idempotent(gw_admin, admin_metadata):
    status = await gw_admin.GetMigrationStatus(admin_pb2.GetMigrationStatusRequest(), metadata=admin_metadata)
    assert not status.pending
    applied = {(m.schema, m.version): m for m in status.applied}
    assert ("vector", 2) in applied and applied[("vector", 2)].name == "rebuild_index"
    assert all(len(m.checksum) == 64 and m.apply_time.seconds > 0 for m in applied.values())
    assert {s.schema: s.applied_version for s in status.schemas} == {
        s.schema: s.latest_version for s in status.schemas
    }
    again = await gw_admin.ApplyMigrations(admin_pb2.ApplyMigrationsRequest(), metadata=admin_metadata)
    assert not again.applied
    events = await gw_admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(
            action="/strata.admin.v1.OperationsService/ApplyMigrations", page_size=1
        ),
        metadata=admin_metadata,
    )
    assert events.events and events.events[0].details["applied"] == []


# -- audit ----------------------------------------------------------------------


async def test_every_key_and_tenant_mutation_is_audited(gw_admin, gw_tenants, admin_metadata, stack):
    slug = f"audit-{uuid.uuid4().hex[:8]}"
    started = timestamp_pb2.Timestamp()
    started.GetCurrentTime()
    started.seconds -= 1
    await gw_tenants.CreateTenant(
        tenants_pb2.CreateTenantRequest(tenant=tenants_pb2.Tenant(slug=slug, plan="free")),
        metadata=admin_metadata,
    )
    await gw_tenants.UpdateTenant(
        tenants_pb2.UpdateTenantRequest(
            tenant=tenants_pb2.Tenant(slug=slug, plan="pro"),
            update_mask=field_mask_pb2.FieldMask(paths=["plan"]),
        ),
        metadata=admin_metadata,
    )
    made = await gw_admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant=slug, name="audited", scopes=["kv:read"]),
        metadata=admin_metadata,
    )
    await gw_admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=made.key.key_id), metadata=admin_metadata
    )
    await gw_tenants.DeleteTenant(tenants_pb2.DeleteTenantRequest(slug=slug), metadata=admin_metadata)
    # A refused mutation changes nothing and records nothing.
    await rpc_error(
        gw_admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id="0" * 16), metadata=admin_metadata)
    )

    listed = await gw_admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(start_time=started, page_size=1000), metadata=admin_metadata
    )
    mine = [e for e in listed.events if e.target in (f"tenant/{slug}", f"api_key/{made.key.key_id}")]
    assert [e.action.rsplit("/", 1)[1] for e in reversed(mine)] == [
        "CreateTenant",
        "UpdateTenant",
        "CreateApiKey",
        "RevokeApiKey",
        "DeleteTenant",
    ]
    actor = key_id_of(stack.api_key)
    assert all(e.actor_key_id == actor and e.actor_tenant == "dev" for e in mine)
    assert all(len(e.trace_id) == 32 for e in mine), "calls are traced (the stack exports to a receiver)"
    assert [e.id for e in mine] == sorted((e.id for e in mine), reverse=True)
    create_key = next(e for e in mine if e.action.endswith("CreateApiKey"))
    assert create_key.details["scopes"] == ["kv:read"] and create_key.details["tenant"] == slug
    assert made.api_key not in str(create_key.details), "secrets are never audited"
    update = next(e for e in mine if e.action.endswith("UpdateTenant"))
    assert update.details["fields"] == ["plan"]
    assert not any(e.target == "api_key/" + "0" * 16 for e in listed.events)


async def test_audit_events_filter_and_page_newest_first(gw_admin, admin_metadata):
    names = [f"pager-{uuid.uuid4().hex[:6]}-{i}" for i in range(5)]
    for name in names:
        await gw_admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant="dev", name=name, scopes=["kv:read"]),
            metadata=admin_metadata,
        )
    request = admin_pb2.ListAuditEventsRequest(
        action="/strata.admin.v1.ApiKeyService/CreateApiKey", target_prefix="api_key/", page_size=2
    )
    seen: list[admin_pb2.AuditEvent] = []
    while True:
        page = await gw_admin.ListAuditEvents(request, metadata=admin_metadata)
        assert len(page.events) <= 2
        seen.extend(page.events)
        if not page.next_page_token or len(seen) >= 6:
            break
        request.page_token = page.next_page_token
    assert [e.details["name"] for e in seen[:5]] == list(reversed(names))
    assert all(e.action == "/strata.admin.v1.ApiKeyService/CreateApiKey" for e in seen)
    # A token belongs to its filters.
    changed = admin_pb2.ListAuditEventsRequest(
        action="/strata.admin.v1.ApiKeyService/RevokeApiKey", page_size=2, page_token=request.page_token
    )
    assert_invalid(await rpc_error(gw_admin.ListAuditEvents(changed, metadata=admin_metadata)), "page_token")
    by_actor = await gw_admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(actor_key_id="nobody", page_size=5), metadata=admin_metadata
    )
    assert not by_actor.events


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"action": "CreateApiKey"}, "action"),
        ({"action": "/x/y'; DROP TABLE admin.audit_log; --"}, "action"),
        ({"actor_key_id": "k" * 65}, "actor_key_id"),
        ({"target_prefix": "t" * 301}, "target_prefix"),
        ({"page_size": 1001}, "page_size"),
        (
            {
                "start_time": timestamp_pb2.Timestamp(seconds=200),
                "end_time": timestamp_pb2.Timestamp(seconds=100),
            },
            "end_time",
        ),
        ({"start_time": timestamp_pb2.Timestamp(seconds=10**13)}, "start_time"),
        ({"page_token": "not-a-token"}, "page_token"),
    ],
)
async def test_list_audit_events_refuses_bad_input(gw_admin, admin_metadata, request_fields, field):
    error = await rpc_error(
        gw_admin.ListAuditEvents(admin_pb2.ListAuditEventsRequest(**request_fields), metadata=admin_metadata)
    )
    assert_invalid(error, field)


async def test_the_service_role_cannot_rewrite_the_audit_log(settings):
    conn = await asyncpg.connect(settings.database_url)
    try:
        for statement in ("DELETE FROM admin.audit_log", "UPDATE admin.audit_log SET target = 'x'"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


# -- who may call ---------------------------------------------------------------


async def test_a_key_without_the_admin_scope_is_refused_on_every_admin_call(gateway_channel, make_key):
    api_key, _ = await make_key(f"noadmin-{uuid.uuid4().hex[:6]}", "kv:read", "kv:write", "tenants:write")
    metadata = bearer(api_key)
    methods = [m for service in admin_pb2.DESCRIPTOR.services_by_name.values() for m in service.methods]
    for method in methods:
        path = f"/{method.containing_service.full_name}/{method.name}"
        if method.client_streaming:
            call = channel_call(gateway_channel.stream_unary(path), iter([b""]), metadata)
        elif method.server_streaming:
            call = drain(gateway_channel.unary_stream(path)(b"", metadata=metadata))
        else:
            call = channel_call(gateway_channel.unary_unary(path), b"", metadata)
        error = await rpc_error(call)
        expected = "operator"
        if method.containing_service.name in {"ApiKeyService", "AuditService"}:
            expected = "admin"
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (method.name, error)
        assert expected in error.details(), (method.name, error.details())


async def channel_call(multicallable, request, metadata):
    return await multicallable(request, metadata=metadata)


async def drain(stream) -> None:
    async for _ in stream:
        pass


# -- grpcurl ----------------------------------------------------------------------


async def test_grpcurl_reads_health_and_the_audit_log(stack):
    from tests.e2e.test_traces import grpcurl

    code, out = await grpcurl(stack, "strata.admin.v1.OperationsService/GetSystemHealth", {})
    assert code == 0, out
    health = json.loads(out)
    assert health["status"] == "SERVING_STATUS_SERVING", health.get("reasons")
    assert {c["component"] for c in health["components"]} == {"kv", "tenants", "vector", "admin", "gateway"}
    code, out = await grpcurl(stack, "strata.admin.v1.AuditService/ListAuditEvents", {"pageSize": 1})
    assert code == 0, out
    assert len(json.loads(out).get("events", [])) <= 1
    code, out = await grpcurl(stack, "strata.admin.v1.OperationsService/InvalidateCache", {"service": "nope"})
    assert code != 0 and "InvalidArgument" in out and "service" in out, out
