"""Migration 0006: keys made with the once-global admin scope keep what they could do."""

from __future__ import annotations

import secrets
from pathlib import Path

import asyncpg

MIGRATION = Path(__file__).resolve().parents[2] / "services/admin/migrations/0006_operator_scope.sql"


async def test_admin_keys_made_before_become_operator_keys_too_and_others_stay_as_they_were(settings):
    conn = await asyncpg.connect(settings.migrate_database_url)
    try:
        async with conn.transaction():
            ids = {name: secrets.token_hex(8) for name in ("admin", "reader", "both")}
            for name, scopes in (
                ("admin", ["admin"]),
                ("reader", ["kv:read"]),
                ("both", ["admin", "operator"]),
            ):
                await conn.execute(
                    "INSERT INTO admin.api_keys (key_id, tenant, name, scopes, secret_hash) "
                    "VALUES ($1, 'dev', $2, $3, '\\x00')",
                    ids[name],
                    f"migration test {name}",
                    scopes,
                )
            for _ in range(2):  # and again: it changes nothing the second time
                await conn.execute(MIGRATION.read_text())
            scopes = {
                row["name"].removeprefix("migration test "): list(row["scopes"])
                for row in await conn.fetch(
                    "SELECT name, scopes FROM admin.api_keys WHERE key_id = ANY($1::text[])",
                    list(ids.values()),
                )
            }
            assert scopes == {
                "admin": ["admin", "operator"],
                "reader": ["kv:read"],
                "both": ["admin", "operator"],
            }
            raise _RollBack
    except _RollBack:
        pass
    finally:
        await conn.close()


class _RollBack(Exception):
    """Leaves the session's database as it was."""
