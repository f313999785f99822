"""ListApiKeys through the gateway with the admin key: what it lists, filters and pages."""

from __future__ import annotations

import time

import pytest
from strata.admin.v1 import admin_pb2

pytestmark = pytest.mark.e2e


@pytest.fixture
async def create(gw_admin, admin_metadata, make_key):
    """Create a key named ``name`` for ``tenant``; the CreateApiKeyResponse.

    A tenant's first create() registers it through make_key, which makes one key more.
    """
    registered: set[str] = set()

    async def made(tenant: str, name: str, *scopes: str) -> admin_pb2.CreateApiKeyResponse:
        if tenant not in registered:
            await make_key(tenant, "kv:read")
            registered.add(tenant)
        return await gw_admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant=tenant, name=name, scopes=list(scopes)),
            metadata=admin_metadata,
        )

    return made


@pytest.fixture
def list_keys(gw_admin, admin_metadata):
    """Every page of ListApiKeys for ``request``'s filters, as (keys, pages)."""

    async def listed(**filters: object) -> tuple[list[admin_pb2.ApiKey], list[admin_pb2.ListApiKeysResponse]]:
        pages: list[admin_pb2.ListApiKeysResponse] = []
        token = ""
        while True:
            page = await gw_admin.ListApiKeys(
                admin_pb2.ListApiKeysRequest(page_token=token, **filters), metadata=admin_metadata
            )
            pages.append(page)
            token = page.next_page_token
            if not token:
                return [key for p in pages for key in p.keys], pages

    return listed


async def test_a_created_key_is_listed_with_its_fields_and_no_secret(create, list_keys, slug):
    before = time.time()
    made = await create(slug, "billing-service", "kv:write", "kv:read")
    keys, pages = await list_keys(tenant=slug)
    [listed] = [k for k in keys if k.key_id == made.key.key_id]
    assert (listed.key_id, listed.tenant, listed.name) == (made.key.key_id, slug, "billing-service")
    assert list(listed.scopes) == ["kv:read", "kv:write"]  # sorted
    assert before - 5 <= listed.create_time.ToSeconds() <= time.time() + 5
    assert not listed.HasField("revoke_time")
    secret = made.api_key.rsplit("_", 1)[1]
    assert all(secret.encode() not in page.SerializeToString() for page in pages)


async def test_revoked_keys_are_listed_only_with_include_revoked(
    create, list_keys, gw_admin, admin_metadata, slug
):
    kept = await create(slug, "kept", "kv:read")
    revoked = await create(slug, "revoked", "kv:read")
    await gw_admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=revoked.key.key_id), metadata=admin_metadata
    )
    live, _ = await list_keys(tenant=slug)
    every, _ = await list_keys(tenant=slug, include_revoked=True)
    live_ids = {k.key_id for k in live}
    assert kept.key.key_id in live_ids and revoked.key.key_id not in live_ids
    assert all(not k.HasField("revoke_time") for k in live)
    [shown] = [k for k in every if k.key_id == revoked.key.key_id]
    assert shown.HasField("revoke_time")
    assert {k.key_id for k in every} == live_ids | {revoked.key.key_id}


async def test_the_tenant_filter_lists_that_tenants_keys_only(create, list_keys, slug):
    mine = await create(slug, "mine", "kv:read")
    theirs = await create(f"{slug}-b", "theirs", "kv:read")
    keys, _ = await list_keys(tenant=slug)
    assert {k.tenant for k in keys} == {slug}
    ids = {k.key_id for k in keys}
    assert mine.key.key_id in ids and theirs.key.key_id not in ids
    everyone, _ = await list_keys()
    assert {mine.key.key_id, theirs.key.key_id} <= {k.key_id for k in everyone}


async def test_pages_list_every_key_once_in_key_id_order(create, list_keys, slug):
    made = [await create(slug, f"key {i}", "kv:read") for i in range(4)]
    whole, _ = await list_keys(tenant=slug)
    paged, pages = await list_keys(tenant=slug, page_size=2)
    ids = [k.key_id for k in paged]
    # Four made here and the one that registered the tenant.
    assert len(ids) == 5 and [len(p.keys) for p in pages] == [2, 2, 1]
    assert ids == sorted(ids) == [k.key_id for k in whole]
    assert {m.key.key_id for m in made} <= set(ids)
