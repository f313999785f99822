"""Backups, restores and branches (BackupService) through the real gateway, against real Postgres.

A few 1 MiB random (incompressible) KV values make the archive several
chunks long, and long enough that an unread pg_dump blocks on its pipe.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2
from strata.admin.v1 import admin_pb2
from strata.kv.v1 import kv_pb2
from strata.tenants.v1 import tenants_pb2

from services.admin.branches.archives import ArchiveSigner
from services.admin.branches.backups import Backups
from services.admin.branches.names import DATABASE_PREFIX
from services.admin.branches.tools import CHUNK_BYTES, pg_tool
from shared.api.errors import Code, StrataError
from shared.config.settings import Settings
from shared.storage.db import Database
from tests.conftest import TEST_INTERNAL_SECRET
from tests.support.calls import bearer
from tests.support.errors import error_info, field_violations
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

RUN = f"t{uuid.uuid4().hex[:8]}"  # every branch this module makes starts with it
NAMESPACE = f"backups-{RUN}"
VALUES = 4  # 1 MiB each
BACKUPS = "/strata.admin.v1.BackupService/"


@asynccontextmanager
async def owner(settings: Settings, database: str | None = None) -> AsyncIterator[asyncpg.Connection]:
    """The owner role on the live database or on ``database``."""
    conn = await asyncpg.connect(settings.migrate_database_url, database=database)
    try:
        yield conn
    finally:
        await conn.close()


async def database_exists(settings: Settings, database: str) -> bool:
    async with owner(settings) as conn:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database))


async def branch_names(gw_admin, metadata) -> list[str]:
    return [
        b.name
        for b in (await gw_admin.ListBranches(admin_pb2.ListBranchesRequest(), metadata=metadata)).branches
    ]


async def table_digests(conn: asyncpg.Connection) -> dict[str, str]:
    """An md5 of every row of every Strata table (the branch registry aside: backups leave it out)."""
    await conn.execute("SET row_security = off")  # fails loudly rather than compare filtered rows
    tables = await conn.fetch(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
        "WHERE schemaname IN ('kv', 'tenants', 'vector', 'admin', 'public') "
        "AND (schemaname, tablename) <> ('admin', 'branches') ORDER BY 1"
    )
    digests = {}
    for (table,) in tables:
        digests[table] = await conn.fetchval(
            f"SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM {table} t"
        )
    return digests


def upload(
    database: str, archive: bytes, sha256: str = "", signature: str | None = None
) -> AsyncIterator[admin_pb2.RestoreRequest]:
    """The messages of a Restore of ``archive``; signed as this deployment's Backup signs, unless
    ``signature`` says otherwise."""
    if signature is None:
        signature = sign(archive)

    async def messages() -> AsyncIterator[admin_pb2.RestoreRequest]:
        yield admin_pb2.RestoreRequest(database=database, sha256=sha256, signature=signature)
        for start in range(0, len(archive), CHUNK_BYTES):
            yield admin_pb2.RestoreRequest(data=archive[start : start + CHUNK_BYTES])

    return messages()


SIGNER = ArchiveSigner(TEST_INTERNAL_SECRET.encode())


def sign(archive: bytes) -> str:
    signing = SIGNER.start()
    signing.update(archive)
    return signing.hexdigest()


@dataclass
class Backup:
    chunks: list[admin_pb2.BackupResponse]
    archive: bytes
    digests: dict[str, str]  # the live database's tables while the backup ran
    seconds: float


@pytest.fixture(scope="module")
async def dataset(gw_kv, gw_records, admin_metadata) -> None:
    """Random KV values and one record of tenant 'dev' (the admin key's tenant)."""
    for i in range(VALUES):
        await gw_kv.Put(
            kv_pb2.PutRequest(namespace=NAMESPACE, key=f"k{i}", value=os.urandom(1024 * 1024)),
            metadata=admin_metadata,
        )
    data = struct_pb2.Struct()
    data.update({"run": RUN})
    await gw_records.CreateRecord(
        tenants_pb2.CreateRecordRequest(record=tenants_pb2.Record(collection=NAMESPACE, id="r1", data=data)),
        metadata=admin_metadata,
    )


@pytest.fixture(scope="module", autouse=True)
async def drop_leftovers(settings) -> AsyncIterator[None]:
    """Whatever a failing test leaves of this module's branches goes at the end."""
    yield
    async with owner(settings) as conn:
        for (database,) in await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"{DATABASE_PREFIX}{RUN}%"
        ):
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await conn.execute("DELETE FROM admin.branches WHERE name LIKE $1", f"{RUN}%")


@pytest.fixture(scope="module")
async def backup(gw_admin, admin_metadata, settings, dataset) -> Backup:
    """One backup, taken while the live tables did not change (checked before and after)."""
    for _ in range(3):
        async with owner(settings) as conn:
            before = await table_digests(conn)
        started = time.monotonic()
        chunks = [c async for c in gw_admin.Backup(admin_pb2.BackupRequest(), metadata=admin_metadata)]
        seconds = time.monotonic() - started
        async with owner(settings) as conn:
            if await table_digests(conn) == before:
                return Backup(chunks, b"".join(c.data for c in chunks), before, seconds)
    raise AssertionError("the live database kept changing while it was backed up")


# -- backup and restore ----------------------------------------------------------


async def test_backup_streams_contiguous_chunks_with_size_and_sha256_last(backup):
    assert len(backup.chunks) >= VALUES  # the random values do not compress
    offset = 0
    for chunk in backup.chunks:
        assert chunk.offset == offset
        assert 0 < len(chunk.data) <= CHUNK_BYTES
        offset += len(chunk.data)
    assert all(c.total_bytes == 0 and c.sha256 == "" for c in backup.chunks[:-1])
    assert backup.chunks[-1].total_bytes == len(backup.archive) == offset
    assert backup.chunks[-1].sha256 == hashlib.sha256(backup.archive).hexdigest()
    assert backup.archive.startswith(b"PGDMP")
    print(f"backup: {len(backup.archive)} bytes in {len(backup.chunks)} chunks, {backup.seconds:.2f} s")


async def test_a_restored_backup_holds_the_same_data(gw_admin, admin_metadata, settings, backup):
    name = f"{RUN}_restored"
    sha256 = hashlib.sha256(backup.archive).hexdigest()
    started = time.monotonic()
    restored = await gw_admin.Restore(upload(name, backup.archive, sha256), metadata=admin_metadata)
    print(f"restore: {len(backup.archive)} bytes in {time.monotonic() - started:.2f} s")
    assert restored.bytes_read == len(backup.archive)
    assert restored.branch.name == name
    assert restored.branch.origin == "restore"
    assert restored.branch.bytes > len(backup.archive)
    async with owner(settings, DATABASE_PREFIX + name) as conn:
        assert await table_digests(conn) == backup.digests
    assert name in await branch_names(gw_admin, admin_metadata)
    await gw_admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name=name), metadata=admin_metadata)
    assert not await database_exists(settings, DATABASE_PREFIX + name)


async def test_a_cancelled_backup_stops_and_the_next_one_works(gw_admin, admin_metadata, settings, dataset):
    call = gw_admin.Backup(admin_pb2.BackupRequest(), metadata=admin_metadata)
    assert len((await call.read()).data) == CHUNK_BYTES
    call.cancel()
    await eventually(lambda: _is_zero(backup_connections(settings)))
    chunks = [c async for c in gw_admin.Backup(admin_pb2.BackupRequest(), metadata=admin_metadata)]
    assert chunks[-1].sha256 == hashlib.sha256(b"".join(c.data for c in chunks)).hexdigest()


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("not an archive", grpc.StatusCode.INVALID_ARGUMENT, "NOT_A_BACKUP"),
        ("sha256 mismatch", grpc.StatusCode.INVALID_ARGUMENT, "CHECKSUM_MISMATCH"),
        ("truncated archive", grpc.StatusCode.INVALID_ARGUMENT, "RESTORE_FAILED"),
        ("no archive bytes", grpc.StatusCode.INVALID_ARGUMENT, "NOT_A_BACKUP"),
    ],
)
async def test_a_restore_that_fails_keeps_nothing(
    gw_admin, admin_metadata, settings, backup, case, code, reason
):
    name = f"{RUN}_{case.replace(' ', '_').replace('256', '')}"
    archive, sha256 = {
        "not an archive": (b"this is not a backup\n" * 1000, ""),
        "sha256 mismatch": (backup.archive, "0" * 64),
        "truncated archive": (backup.archive[: len(backup.archive) // 2], ""),
        "no archive bytes": (b"", ""),
    }[case]
    error = await refused(gw_admin.Restore(upload(name, archive, sha256), metadata=admin_metadata))
    assert (error.code(), error_info(error).reason) == (code, reason)
    assert not await database_exists(settings, DATABASE_PREFIX + name)
    assert name not in await branch_names(gw_admin, admin_metadata)


async def test_an_empty_restore_stream_is_invalid(gw_admin, admin_metadata):
    async def nothing() -> AsyncIterator[admin_pb2.RestoreRequest]:
        return
        yield

    error = await refused(gw_admin.Restore(nothing(), metadata=admin_metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "database" in field_violations(error)


@pytest.mark.parametrize("name", ["", "Upper", "1abc", "with-dash", "a" * 49, "strata branch"])
async def test_bad_names_are_invalid(gw_admin, admin_metadata, backup, name):
    error = await refused(gw_admin.Restore(upload(name, backup.archive), metadata=admin_metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "database" in field_violations(error)
    for call in (
        gw_admin.CreateBranch(admin_pb2.CreateBranchRequest(name=name), metadata=admin_metadata),
        gw_admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name=name), metadata=admin_metadata),
    ):
        error = await refused(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "name" in field_violations(error)


async def test_a_cancelled_restore_keeps_nothing(gw_admin, admin_metadata, settings, backup):
    name = f"{RUN}_cancelled"
    spools_before = spools()
    sent = asyncio.Event()

    async def stalls() -> AsyncIterator[admin_pb2.RestoreRequest]:
        yield admin_pb2.RestoreRequest(database=name, data=backup.archive[:CHUNK_BYTES])
        yield admin_pb2.RestoreRequest(data=backup.archive[CHUNK_BYTES : 2 * CHUNK_BYTES])
        sent.set()
        await asyncio.sleep(60)

    call = gw_admin.Restore(stalls(), metadata=admin_metadata)
    await asyncio.wait_for(sent.wait(), 10)
    # The upload is spooled to a private folder before anything is restored.
    await eventually(
        lambda: _is_true(set(Path(tempfile.gettempdir()).glob("strata-restore-*")) - spools_before)
    )
    call.cancel()
    await eventually(lambda: _is_true(not spools() - spools_before))
    assert not await database_exists(settings, DATABASE_PREFIX + name)
    async with owner(settings) as conn:
        assert not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", DATABASE_PREFIX + name)
    assert name not in await branch_names(gw_admin, admin_metadata)


def spools() -> set[Path]:
    """The folders admin spools uploads to (this machine's temporary folder)."""
    return set(Path(tempfile.gettempdir()).glob("strata-restore-*"))


async def _is_true(value: object) -> bool:
    return bool(value)


async def _not(check) -> bool:
    return not await check


# -- branches --------------------------------------------------------------------


async def test_a_branch_diverges_from_its_parent(
    gw_admin, gw_kv, gw_tenants, admin_metadata, settings, dataset
):
    name = f"{RUN}_branch"
    database = DATABASE_PREFIX + name
    started = time.monotonic()
    made = await gw_admin.CreateBranch(admin_pb2.CreateBranchRequest(name=name), metadata=admin_metadata)
    print(f"branch: {made.branch.bytes} bytes in {time.monotonic() - started:.2f} s")
    assert (made.branch.name, made.branch.origin) == (name, "branch")
    assert made.branch.bytes > 0

    # Written to the live system after branching: the branch does not see it.
    await gw_kv.Put(
        kv_pb2.PutRequest(namespace=NAMESPACE, key="after", value=b"live"), metadata=admin_metadata
    )
    slug = f"branch-only-{RUN}"
    async with owner(settings, database) as conn:
        keys = await conn.fetch("SELECT key FROM kv.entries WHERE namespace = $1 ORDER BY key", NAMESPACE)
        assert [r["key"] for r in keys] == [f"k{i}" for i in range(VALUES)]
        # Written to the branch: the live system does not see it.
        await conn.execute("INSERT INTO tenants.tenants (slug) VALUES ($1)", slug)
    error = await refused(
        gw_tenants.GetTenant(tenants_pb2.GetTenantRequest(slug=slug), metadata=admin_metadata)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND

    # The same service role can use the branch, under the same row-level security.
    conn = await asyncpg.connect(settings.database_url, database=database)
    try:
        count = "SELECT count(*) FROM tenants.records WHERE collection = $1"
        assert await conn.fetchval(count, NAMESPACE) == 0  # no tenant set: no rows
        async with conn.transaction():
            await conn.execute("SELECT set_config('strata.tenant_id', 'dev', true)")
            assert await conn.fetchval(count, NAMESPACE) == 1
    finally:
        await conn.close()

    # What pg_dump does not carry is copied too: who may connect, and the LEAKPROOF marks.
    acl = (
        "SELECT array_agg(a ORDER BY a::text) FROM pg_database d, aclexplode(d.datacl) a "
        "WHERE d.datname = current_database() AND a.grantee <> d.datdba"
    )
    leakproof = "SELECT array_agg(oid::regprocedure::text ORDER BY oid) FROM pg_proc WHERE proleakproof"
    async with owner(settings) as live, owner(settings, database) as copy:
        assert await copy.fetchval(acl) == await live.fetchval(acl)
        assert await copy.fetchval(leakproof) == await live.fetchval(leakproof)


async def test_branches_are_listed_and_deleted(gw_admin, admin_metadata, settings):
    name = f"{RUN}_listed"
    await gw_admin.CreateBranch(admin_pb2.CreateBranchRequest(name=name), metadata=admin_metadata)
    listed = (await gw_admin.ListBranches(admin_pb2.ListBranchesRequest(), metadata=admin_metadata)).branches
    assert [b.name for b in listed] == sorted(b.name for b in listed)
    (branch,) = [b for b in listed if b.name == name]
    assert branch.origin == "branch"
    assert branch.bytes > 0
    assert branch.create_time.seconds > 0

    await gw_admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name=name), metadata=admin_metadata)
    assert not await database_exists(settings, DATABASE_PREFIX + name)
    assert name not in await branch_names(gw_admin, admin_metadata)
    error = await refused(
        gw_admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name=name), metadata=admin_metadata)
    )
    assert (error.code(), error_info(error).reason) == (grpc.StatusCode.NOT_FOUND, "BRANCH_NOT_FOUND")


async def test_taken_names_are_refused_and_unregistered_databases_never_dropped(
    gw_admin, admin_metadata, settings, backup
):
    # A database of the branch naming scheme that the registry does not list.
    name = f"{RUN}_foreign"
    database = DATABASE_PREFIX + name
    async with owner(settings) as conn:
        await conn.execute(f'CREATE DATABASE "{database}"')
    try:
        error = await refused(
            gw_admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name=name), metadata=admin_metadata)
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND
        for call in (
            gw_admin.CreateBranch(admin_pb2.CreateBranchRequest(name=name), metadata=admin_metadata),
            gw_admin.Restore(upload(name, backup.archive), metadata=admin_metadata),
        ):
            error = await refused(call)
            assert (error.code(), error_info(error).reason) == (
                grpc.StatusCode.ALREADY_EXISTS,
                "BRANCH_ALREADY_EXISTS",
            )
        assert await database_exists(settings, database)
        assert name not in await branch_names(gw_admin, admin_metadata)
    finally:
        async with owner(settings) as conn:
            await conn.execute(f'DROP DATABASE "{database}"')

    # A registered branch's name.
    name = f"{RUN}_taken"
    await gw_admin.CreateBranch(admin_pb2.CreateBranchRequest(name=name), metadata=admin_metadata)
    for call in (
        gw_admin.CreateBranch(admin_pb2.CreateBranchRequest(name=name), metadata=admin_metadata),
        gw_admin.Restore(upload(name, backup.archive), metadata=admin_metadata),
    ):
        error = await refused(call)
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await database_exists(settings, DATABASE_PREFIX + name)  # the refusals dropped nothing
    await gw_admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name=name), metadata=admin_metadata)


# -- audit and scopes --------------------------------------------------------------


async def test_every_branch_mutation_is_audited(gw_admin, admin_metadata, backup, stack):
    branch, restored, refused_name = f"{RUN}_audit_b", f"{RUN}_audit_r", f"{RUN}_audit_x"
    await gw_admin.CreateBranch(admin_pb2.CreateBranchRequest(name=branch), metadata=admin_metadata)
    await gw_admin.Restore(upload(restored, backup.archive), metadata=admin_metadata)
    for name in (branch, restored):
        await gw_admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name=name), metadata=admin_metadata)
    await refused(gw_admin.Restore(upload(refused_name, b"nope"), metadata=admin_metadata))

    events = (
        await gw_admin.ListAuditEvents(
            admin_pb2.ListAuditEventsRequest(target_prefix=f"branch/{RUN}_audit_"), metadata=admin_metadata
        )
    ).events
    seen = sorted((e.target, e.action) for e in events)
    assert seen == sorted(
        [
            (f"branch/{branch}", BACKUPS + "CreateBranch"),
            (f"branch/{branch}", BACKUPS + "DeleteBranch"),
            (f"branch/{restored}", BACKUPS + "Restore"),
            (f"branch/{restored}", BACKUPS + "DeleteBranch"),
        ]
    )
    admin_key_id = stack.api_key.split("_")[1]
    assert {e.actor_key_id for e in events} == {admin_key_id}
    (restore_event,) = [e for e in events if e.action == BACKUPS + "Restore"]
    assert restore_event.details["sha256"] == hashlib.sha256(backup.archive).hexdigest()
    assert restore_event.details["database"] == DATABASE_PREFIX + restored


async def test_a_key_without_the_admin_scope_is_refused_on_every_call(gw_admin, make_key, slug, backup):
    api_key, _ = await make_key(slug, "kv:read", "kv:write")
    md = bearer(api_key)

    async def backup_call() -> None:
        async for _ in gw_admin.Backup(admin_pb2.BackupRequest(), metadata=md):
            pass

    calls = [
        backup_call(),
        gw_admin.Restore(upload(f"{RUN}_denied", backup.archive[:CHUNK_BYTES]), metadata=md),
        gw_admin.CreateBranch(admin_pb2.CreateBranchRequest(name=f"{RUN}_denied"), metadata=md),
        gw_admin.ListBranches(admin_pb2.ListBranchesRequest(), metadata=md),
        gw_admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name=f"{RUN}_denied"), metadata=md),
    ]
    for call in calls:
        error = await refused(call)
        assert (error.code(), error_info(error).reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "MISSING_SCOPE",
        )


# -- in process: what the gateway cannot show --------------------------------------


class _Context:
    """The little of a ServicerContext that Backups uses."""

    def time_remaining(self) -> float | None:
        return None


@pytest.fixture
async def service_db(settings) -> AsyncIterator[Database]:
    db = await Database.open(settings.database_url, min_size=1, max_size=2)
    yield db
    await db.close()


async def backup_connections(settings: Settings) -> int:
    async with owner(settings) as conn:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'strata-backup'"
            )
        )


async def test_an_abandoned_backup_stops_pg_dump(settings, service_db, dataset):
    backups = Backups(service_db, settings.migrate_database_url, 1 << 40, SIGNER)
    stream = backups.backup(admin_pb2.BackupRequest(), _Context())
    first = await anext(stream)
    assert len(first.data) == CHUNK_BYTES
    # Nobody reads on: pg_dump blocks on its pipe, connected.
    assert await backup_connections(settings) == 1
    await stream.aclose()
    await eventually(lambda: _is_zero(backup_connections(settings)), timeout=5)


async def _is_zero(value) -> bool:
    return await value == 0


def with_netloc(url: str, **parts: Any) -> str:
    """``url`` with its password or port replaced."""
    split = urlsplit(url)
    user = split.username or ""
    password = parts.get("password", split.password or "")
    port = parts.get("port", split.port)
    return urlunsplit(split._replace(netloc=f"{user}:{quote(password)}@{split.hostname}:{port}"))


@pytest.mark.parametrize(
    ("broken", "code"),
    [
        ({"password": "not-the-password-4711"}, Code.INTERNAL),
        ({"port": "1"}, Code.UNAVAILABLE),  # nothing listens there: retry later
    ],
)
async def test_a_failing_pg_dump_answers_a_safe_error(settings, service_db, caplog, broken, code):
    url = with_netloc(settings.migrate_database_url, **broken)
    backups = Backups(service_db, url, 1 << 40, SIGNER)
    with pytest.raises(StrataError) as caught:
        async for _ in backups.backup(admin_pb2.BackupRequest(), _Context()):
            pass
    assert (caught.value.code, caught.value.reason) == (code, "BACKUP_FAILED")
    (logged,) = [r for r in caplog.records if r.name == "services.admin.branches.tools"]
    assert logged.stderr  # the tool's own words are logged for the operator …
    secret = urlsplit(url).password or ""
    assert secret not in logged.stderr  # … never with the password,
    assert logged.stderr not in caught.value.message  # and the caller gets a safe message


async def test_restores_over_the_size_limit_are_refused_and_keep_nothing(settings, service_db, backup):
    backups = Backups(service_db, settings.migrate_database_url, 2 * CHUNK_BYTES, SIGNER)
    name = f"{RUN}_too_large"
    with pytest.raises(StrataError) as caught:
        await backups.restore(upload(name, backup.archive), _Context())
    assert (caught.value.code, caught.value.reason) == (
        Code.RESOURCE_EXHAUSTED,
        "RESTORE_TOO_LARGE",
    )
    assert not await database_exists(settings, DATABASE_PREFIX + name)
    async with owner(settings) as conn:
        assert not await conn.fetchval("SELECT 1 FROM admin.branches WHERE name = $1", name)


async def test_without_the_owner_role_calls_fail_with_a_precondition(service_db, backup):
    backups = Backups(service_db, "", 1 << 40, SIGNER)
    calls: Sequence[Any] = [
        anext(backups.backup(admin_pb2.BackupRequest(), _Context())),
        backups.restore(upload(f"{RUN}_x", backup.archive), _Context()),
        backups.create_branch(admin_pb2.CreateBranchRequest(name=f"{RUN}_x"), _Context()),
        backups.delete_branch(admin_pb2.DeleteBranchRequest(name=f"{RUN}_x"), _Context()),
    ]
    for call in calls:
        with pytest.raises(StrataError) as caught:
            await call
        assert (caught.value.code, caught.value.reason) == (
            Code.FAILED_PRECONDITION,
            "OWNER_ROLE_NOT_CONFIGURED",
        )


async def test_the_tools_found_are_not_older_than_the_server(settings):
    async with owner(settings) as conn:
        server_major = int(await conn.fetchval("SHOW server_version_num")) // 10000
    for tool in ("pg_dump", "pg_restore"):
        proc = await asyncio.create_subprocess_exec(
            await pg_tool(tool), "--version", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert int(out.split(b"(PostgreSQL) ")[1].split(b".")[0]) >= server_major


# -- hostile archives ---------------------------------------------------------------

# A function that runs a shell command, but only once restored into a branch (so that
# building the archive runs nothing), called by a CHECK constraint while rows load.
_TRAP = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE FUNCTION {schema}.{function}(p text) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
    IF current_database() LIKE 'strata_branch_%' THEN
        EXECUTE format('COPY (SELECT 1) TO PROGRAM %L', 'touch {marker}');
    END IF;
    RETURN true;
END $f$;
CREATE TABLE {schema}.trap (v text CHECK ({schema}.{function}(v)));
INSERT INTO {schema}.trap VALUES ('armed');
"""


async def hostile_archive(settings: Settings, schema: str, function: str, marker: Path) -> bytes:
    """A pg_dump archive of a scratch database (as anyone could make in any Postgres) with the trap."""
    source = f"hostile_{uuid.uuid4().hex[:8]}"
    async with owner(settings) as conn:
        await conn.execute(f'CREATE DATABASE "{source}"')
    try:
        async with owner(settings, source) as conn:
            await conn.execute(_TRAP.format(schema=schema, function=function, marker=marker))
        url = urlsplit(settings.migrate_database_url)
        dump = await asyncio.create_subprocess_exec(
            await pg_tool("pg_dump"),
            "--format=custom",
            f"--dbname={urlunsplit(url._replace(netloc=f'{url.username}@{url.hostname}:{url.port}', path='/' + source))}",
            env={**os.environ, "PGPASSWORD": url.password or ""},
            stdout=asyncio.subprocess.PIPE,
        )
        archive, _ = await dump.communicate()
        assert dump.returncode == 0
        return archive
    finally:
        async with owner(settings) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{source}" WITH (FORCE)')


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    folder = Path(tempfile.gettempdir()) / f"strata-marker-{uuid.uuid4().hex[:8]}"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)  # the database's OS user may write here, if anything lets it run a program
    yield folder / "pwned"
    for leftover in folder.iterdir():
        leftover.unlink()
    folder.rmdir()


async def assert_nothing_kept(settings: Settings, gw_admin, admin_metadata, name: str) -> None:
    assert not await database_exists(settings, DATABASE_PREFIX + name)
    async with owner(settings) as conn:
        assert not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", DATABASE_PREFIX + name)
    assert name not in await branch_names(gw_admin, admin_metadata)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no signature", "BACKUP_NOT_SIGNED"),
        ("a made-up signature", "BACKUP_SIGNATURE_INVALID"),
        ("the deployment's signature (a leaked key)", "ARCHIVE_NOT_ALLOWED"),
    ],
)
async def test_an_archive_from_elsewhere_runs_nothing_and_keeps_nothing(
    gw_admin, admin_metadata, settings, marker, case, reason
):
    archive = await hostile_archive(settings, "public", "evil", marker)
    signature = {"no signature": "", "a made-up signature": "ab" * 32}.get(case, sign(archive))
    name = f"{RUN}_hostile_{len(case)}"

    error = await refused(
        gw_admin.Restore(upload(name, archive, signature=signature), metadata=admin_metadata)
    )

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == reason
    if reason == "ARCHIVE_NOT_ALLOWED":
        assert "FUNCTION public.evil" in error.details()
    assert not marker.exists(), "the archive ran a program on the database server"
    await assert_nothing_kept(settings, gw_admin, admin_metadata, name)


async def test_a_signed_archive_that_passes_the_contents_check_still_runs_with_no_privilege(
    gw_admin, admin_metadata, settings, marker
):
    # Named like a function Strata has, in Strata's schema: only the restore's own
    # role stands between the archive and the server now.
    archive = await hostile_archive(settings, "kv", "compact", marker)
    name = f"{RUN}_contained"

    error = await refused(gw_admin.Restore(upload(name, archive), metadata=admin_metadata))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "RESTORE_FAILED"
    assert not marker.exists(), "the restore ran a program on the database server"
    await assert_nothing_kept(settings, gw_admin, admin_metadata, name)


async def test_a_restored_branch_belongs_to_a_role_with_no_privilege(
    gw_admin, admin_metadata, settings, backup
):
    name = f"{RUN}_owned"
    await gw_admin.Restore(upload(name, backup.archive), metadata=admin_metadata)
    role = DATABASE_PREFIX + name
    async with owner(settings) as conn:
        attributes = await conn.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", role)
        assert attributes is not None
        assert not any(
            attributes[a]
            for a in (
                "rolsuper",
                "rolcanlogin",
                "rolbypassrls",
                "rolcreatedb",
                "rolcreaterole",
                "rolreplication",
            )
        )
        assert not await conn.fetchval(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = $1",
            role,
        )
        assert (
            await conn.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", role)
            == role
        )
    async with owner(settings, role) as conn:
        owners = {
            r[0]
            for r in await conn.fetch(
                "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname IN ('kv', 'tenants', 'vector', 'admin')"
            )
        }
        assert owners == {role}
    await gw_admin.DeleteBranch(admin_pb2.DeleteBranchRequest(name=name), metadata=admin_metadata)
    await assert_nothing_kept(settings, gw_admin, admin_metadata, name)
