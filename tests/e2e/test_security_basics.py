"""Security basics of a running stack: the database role services use, peppered key hashes, no secret in logs.

tests/integration/test_database.py checks the service role's attributes
through the URL the tests are given; here the role is checked as the
running processes actually use it (every connection of every service), with
what it could still reach through memberships, schemas and ownership.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from strata.admin.v1 import admin_pb2
from strata.internal.v1 import internal_pb2, internal_pb2_grpc
from strata.kv.v1 import kv_pb2, kv_pb2_grpc
from strata.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from strata.vector.v1 import vector_pb2, vector_pb2_grpc

from shared.api.apikeys import hash_secret, new_api_key, parse_api_key, secrets_match
from shared.api.callers import INTERNAL_SCOPE, Caller
from shared.config.settings import Settings
from shared.rpc.identity import sign_caller
from tests.conftest import TEST_INTERNAL_SECRET
from tests.support.calls import AdminStubs, bearer
from tests.support.otlp import TraceReceiver
from tests.support.stack import TEST_KEY_PEPPER, Stack

pytestmark = pytest.mark.e2e

AUTHENTICATE = "/strata.internal.v1.ApiKeyAuthService/AuthenticateApiKey"
# Applications of the services' own pools (shared/storage/db.py: "strata-<service>").
SERVICE_APPLICATIONS = {"strata-kv", "strata-tenants", "strata-vector", "strata-admin"}
# Postgres' predefined roles that reach files, programs, all data or other sessions.
POWERFUL_ROLES = (
    "pg_read_server_files",
    "pg_write_server_files",
    "pg_execute_server_program",
    "pg_read_all_data",
    "pg_write_all_data",
    "pg_signal_backend",
    "pg_checkpoint",
    "pg_create_subscription",
)
MakeKey = Callable[..., Any]


def _secret(api_key: str) -> str:
    """The secret part of ``sk_<id>_<secret>`` (which may itself contain "_")."""
    parsed = parse_api_key(api_key)
    assert parsed is not None, api_key
    return parsed[1]


@pytest.fixture
def tenant() -> str:
    return f"sec-{uuid.uuid4().hex[:10]}"


# -- the service role, as the services use it -------------------------------------


async def _use_every_pool(stack: Stack) -> None:
    """One call per service, so that each pool holds a live connection (even after a Postgres restart)."""
    metadata = bearer(stack.api_key)
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        await kv_pb2_grpc.KvServiceStub(channel).List(kv_pb2.ListRequest(namespace="sec"), metadata=metadata)
        await tenants_pb2_grpc.RecordServiceStub(channel).ListRecords(
            tenants_pb2.ListRecordsRequest(collection="sec"), metadata=metadata
        )
        await vector_pb2_grpc.VectorServiceStub(channel).ListCollections(
            vector_pb2.ListCollectionsRequest(), metadata=metadata
        )
        await AdminStubs(channel).ListApiKeys(admin_pb2.ListApiKeysRequest(page_size=1), metadata=metadata)


async def test_every_service_connects_as_a_role_that_can_do_nothing_beyond_its_grants(
    stack: Stack, settings: Settings
) -> None:
    await _use_every_pool(stack)
    owner = await asyncpg.connect(settings.migrate_database_url)  # a superuser: sees every session
    try:
        sessions = await owner.fetch(
            "SELECT DISTINCT application_name, usename FROM pg_stat_activity WHERE application_name = ANY($1)",
            sorted(SERVICE_APPLICATIONS),
        )
        assert {row["application_name"] for row in sessions} == SERVICE_APPLICATIONS, sessions
        roles = {row["usename"] for row in sessions}
        assert roles == {urlsplit(settings.database_url).username}, f"services connect as {roles}"
        (role,) = roles
        attributes = await owner.fetchrow(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication "
            "FROM pg_roles WHERE rolname = $1",
            role,
        )
        assert not any(attributes.values()), dict(attributes)
        # Owning an object is holding every right on it (and on a table: ALTER, DROP, DISABLE RLS).
        owned = await owner.fetchval(
            "SELECT (SELECT count(*) FROM pg_class WHERE relowner = r.oid AND relpersistence <> 't') "
            "+ (SELECT count(*) FROM pg_namespace WHERE nspowner = r.oid AND nspname NOT LIKE 'pg_temp%' "
            "   AND nspname NOT LIKE 'pg_toast_temp%') "
            "+ (SELECT count(*) FROM pg_proc WHERE proowner = r.oid) "
            "+ (SELECT count(*) FROM pg_database WHERE datdba = r.oid) "
            "FROM pg_roles r WHERE r.rolname = $1",
            role,
        )
        assert owned == 0
        # What it inherits: only plain group roles, none of them privileged or owning anything.
        inherited = await owner.fetch(
            "SELECT g.rolname, g.rolsuper OR g.rolcreaterole OR g.rolcreatedb OR g.rolbypassrls AS powerful, "
            "g.rolcanlogin, (SELECT count(*) FROM pg_class WHERE relowner = g.oid) AS owns "
            "FROM pg_roles g WHERE pg_has_role($1, g.oid, 'MEMBER') AND g.rolname <> $1",
            role,
        )
        assert all(not row["powerful"] and row["owns"] == 0 for row in inherited), inherited
        for predefined in POWERFUL_ROLES:
            if await owner.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", predefined):
                assert not await owner.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", role, predefined)
        schemas = await owner.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname = ANY($2) AND has_schema_privilege($1, oid, 'CREATE')",
            role,
            ["public", "kv", "tenants", "vector", "admin"],
        )
        assert schemas == [], f"{role} may create objects in {[row['nspname'] for row in schemas]}"
    finally:
        await owner.close()


# -- API keys: peppered hashes, compared whole -------------------------------------


def test_a_key_hash_is_an_hmac_keyed_by_the_pepper() -> None:
    made = new_api_key(b"pepper-one")
    parsed = parse_api_key(made.api_key)
    assert parsed is not None
    secret = parsed[1]
    assert made.secret_hash == hash_secret(b"pepper-one", secret)
    assert hash_secret(b"pepper-two", secret) != made.secret_hash  # same secret, other pepper
    assert made.secret_hash != hashlib.sha256(secret.encode()).digest()  # not a bare hash either
    assert secret.encode() not in made.secret_hash and len(made.secret_hash) == 32


def test_comparison_refuses_any_stored_value_but_the_exact_digest() -> None:
    # Timing is not measured (too noisy to assert honestly); what is pinned is that stored
    # values of any length or content only match the exact digest, and never raise.
    pepper, secret = b"pepper", "s" * 43
    stored = hash_secret(pepper, secret)
    assert secrets_match(pepper, secret, stored)
    for other in (b"", stored[:-1], stored + b"\x00", b"\x00" * 32, stored[::-1], b"x" * 4096):
        assert not secrets_match(pepper, secret, other)
    for guess in ("", secret[:-1], secret + "s", secret[:-1] + "t", secret.upper()):
        assert not secrets_match(pepper, guess, stored)


async def test_admin_stores_only_the_peppered_hash_of_a_key(
    stack: Stack, settings: Settings, make_key: MakeKey, tenant: str
) -> None:
    api_key, key_id = await make_key(tenant, "kv:read")
    secret = _secret(api_key)
    conn = await asyncpg.connect(settings.database_url)  # what the service role (a service) can read
    try:
        row = await conn.fetchrow(
            "SELECT secret_hash, t::text AS whole FROM admin.api_keys t WHERE key_id = $1", key_id
        )
        audit = await conn.fetchval(
            "SELECT string_agg(t::text, '') FROM admin.audit_log t WHERE target = $1", f"api_key/{key_id}"
        )
    finally:
        await conn.close()
    stored = bytes(row["secret_hash"])
    assert stored == hash_secret(TEST_KEY_PEPPER.encode(), secret)  # the stack's pepper, not another
    assert stored != hash_secret(b"another pepper", secret)
    assert secret not in row["whole"] and secret not in (audit or "")
    assert audit, "the key's creation is audited"


async def test_wrong_secrets_of_every_length_are_unauthenticated(
    stack: Stack, make_key: MakeKey, tenant: str
) -> None:
    api_key, key_id = await make_key(tenant, "kv:read")
    other_key, _ = await make_key(tenant, "kv:read")
    secret = _secret(api_key)

    def other(char: str) -> str:
        return "B" if char == "A" else "A"

    presented = {
        "the key itself": api_key,
        "last character changed": api_key[:-1] + other(api_key[-1]),
        "first secret character changed": f"sk_{key_id}_{other(secret[0])}{secret[1:]}",
        "one character short": api_key[:-1],
        "one character long": api_key + "A",
        "empty secret": f"sk_{key_id}_",
        "another key's secret": f"sk_{key_id}_{_secret(other_key)}",
        "twice the secret": f"sk_{key_id}_{secret}{secret}",
    }
    caller = Caller("strata-system", frozenset({INTERNAL_SCOPE}), "gateway")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['admin']}") as channel:
        stub = internal_pb2_grpc.ApiKeyAuthServiceStub(channel)
        for what, candidate in presented.items():
            request = internal_pb2.AuthenticateApiKeyRequest(api_key=candidate)
            metadata = sign_caller(
                TEST_INTERNAL_SECRET.encode(), AUTHENTICATE, caller, body=request.SerializeToString()
            )
            if what == "the key itself":
                assert (await stub.AuthenticateApiKey(request, metadata=metadata)).key_id == key_id
                continue
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.AuthenticateApiKey(request, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, what


# -- no secret in any log or trace ------------------------------------------------


async def _failing_calls(
    stack: Stack, api_key: str, key_id: str, wrong: str, admin: Sequence[tuple[str, str]]
) -> None:
    """Calls that carry secrets and fail: bad key, missing scope, revoked key, unsigned and forged calls."""
    async with grpc.aio.insecure_channel(stack.gateway) as gateway:
        kv = kv_pb2_grpc.KvServiceStub(gateway)
        put = kv_pb2.PutRequest(namespace="sec", key="k", value=b"v")
        for metadata in (bearer(wrong), bearer(api_key), bearer(api_key[:-1])):  # wrong, read-only, malformed
            with pytest.raises(grpc.aio.AioRpcError):
                await kv.Put(put, metadata=metadata)
        await AdminStubs(gateway).RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=admin)
        await asyncio.sleep(1.2)  # past the gateway's key cache
        with pytest.raises(grpc.aio.AioRpcError):
            await kv.Get(kv_pb2.GetRequest(namespace="sec", key="k"), metadata=bearer(api_key))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['kv']}") as direct:
        forged = sign_caller(
            b"guessed",
            "/strata.kv.v1.KvService/Put",
            Caller("dev", frozenset({"admin"}), "x"),
            body=put.SerializeToString(),
        )
        for metadata in (bearer(api_key), tuple(forged) + bearer(api_key)):
            with pytest.raises(grpc.aio.AioRpcError):
                await kv_pb2_grpc.KvServiceStub(direct).Put(put, metadata=metadata)


async def test_no_secret_reaches_the_processes_logs_traces_or_redis(
    stack: Stack,
    settings: Settings,
    receiver: TraceReceiver,
    make_key: MakeKey,
    admin_metadata: Sequence[tuple[str, str]],
    tenant: str,
) -> None:
    api_key, key_id = await make_key(tenant, "kv:read")
    wrong = api_key[:-6] + ("AAAAAA" if not api_key.endswith("AAAAAA") else "BBBBBB")
    await _failing_calls(stack, api_key, key_id, wrong, admin_metadata)
    await receiver.wait_for(lambda spans: any(s.name.endswith("RevokeApiKey") for s in spans))
    await asyncio.sleep(0.5)  # the last lines and spans on their way
    secrets = {
        "an API key's secret": _secret(api_key),
        "a wrong secret presented": _secret(wrong),
        "the internal signing secret": TEST_INTERNAL_SECRET,
        "the key pepper": TEST_KEY_PEPPER,
        "the service role's password": urlsplit(settings.database_url).password,
        "the owner role's password": urlsplit(settings.migrate_database_url).password,
        "the Redis password": urlsplit(settings.redis_url).password,
    }
    log = stack.output
    # The output really holds every process's log lines (JSON, one per line).
    for service in ("kv", "tenants", "vector", "admin", "gateway"):
        assert any(f'"service": "{service}"' in line for line in log), f"no log line of {service}"
    spans = [repr(span) for span in receiver.spans]
    redis = aioredis.from_url(settings.redis_url)
    try:
        keys = [key.decode(errors="replace") async for key in redis.scan_iter(count=1000)]
    finally:
        await redis.aclose()
    for what, secret in secrets.items():
        if not secret:
            continue  # e.g. a passwordless external Redis
        assert not [line for line in log if secret in line], f"{what} is in the processes' output"
        assert not [span for span in spans if secret in span], f"{what} is in an exported span"
        assert not [key for key in keys if secret in key], f"{what} is in a Redis key name"
    # The dev key is printed on purpose in the launcher's banner, for the developer; nowhere else.
    dev_secret = _secret(stack.api_key)
    assert [line for line in log if dev_secret in line] == [
        line for line in log if line.startswith("Dev API key") and dev_secret in line
    ]
