"""How the admin service hands the owner role's URL to pg_dump / pg_restore: never the password."""

from __future__ import annotations

import pytest

from services.admin.branches.owner import OwnerRole


def test_the_password_travels_in_the_environment_only():
    owner = OwnerRole.parse("postgresql://strata_owner:p%40ss%3Aw0rd@db.internal:6432/strata?sslmode=require")
    assert owner.database == "strata"
    conninfo = owner.conninfo("strata_branch_preview1")
    assert conninfo == "postgresql://strata_owner@db.internal:6432/strata_branch_preview1?sslmode=require"
    assert "p@ss" not in conninfo and "w0rd" not in conninfo
    assert owner.env("strata-backup")["PGPASSWORD"] == "p@ss:w0rd"
    assert owner.env("strata-backup")["PGAPPNAME"] == "strata-backup"


def test_a_password_query_parameter_is_moved_to_the_environment():
    owner = OwnerRole.parse("postgres://me@h1:5432,h2:5433/strata?password=secret&connect_timeout=3")
    assert owner.conninfo("strata") == "postgres://me@h1:5432,h2:5433/strata?connect_timeout=3"
    assert owner.env("x")["PGPASSWORD"] == "secret"


def test_without_a_database_libpq_uses_the_users_name():
    owner = OwnerRole.parse("postgresql://alice@localhost")
    assert owner.database == "alice"
    assert "PGPASSWORD" not in owner.env("x")


def test_the_tools_do_not_inherit_this_processes_secrets(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STRATA_KEY_PEPPER", "pepper-pepper-pepper")
    monkeypatch.setenv("DATABASE_URL", "postgresql://svc:svc-secret@h/strata")
    monkeypatch.setenv("PGSSLROOTCERT", "/etc/ssl/pg-root.crt")
    env = OwnerRole.parse("postgresql://o:pw@h/strata").env("x")
    assert "STRATA_KEY_PEPPER" not in env and "DATABASE_URL" not in env
    assert env["PGSSLROOTCERT"] == "/etc/ssl/pg-root.crt"
    assert "PATH" in env
