"""The API key calls of ``strata.admin.v1.AdminService``: validation and mapping; SQL in :mod:`.store`.

CreateApiKey, ListApiKeys and RevokeApiKey need the ``admin`` scope, and a
tenant's admin manages its own tenant's keys only; AuthenticateApiKey is the
gateway's (``internal`` scope).
"""

from __future__ import annotations

import re

from strata.admin.v1 import admin_pb2

from services.admin.keys.mapping import key_message
from services.admin.keys.store import ApiKeyStore
from shared.api.apikeys import new_api_key
from shared.api.callers import (
    OPERATOR_SCOPE,
    SCOPES,
    Caller,
    current_caller,
    require_scope,
)
from shared.api.errors import Code, FieldViolation, StrataError, invalid_argument, not_found
from shared.api.pagetoken import PageTokens, page_size
from shared.rpc.handlers import Context
from shared.storage.db import deadline_timeout

__all__ = ["ApiKeyServicer"]

TENANT_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


class ApiKeyServicer:
    """Serves the API key calls from admin.api_keys."""

    def __init__(self, keys: ApiKeyStore, pepper: bytes, tokens: PageTokens) -> None:
        """``pepper``: mixed into every secret's hash (STRATA_KEY_PEPPER); ``tokens``: page tokens."""
        self._keys = keys
        self._pepper = pepper
        self._tokens = tokens

    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: Context
    ) -> admin_pb2.CreateApiKeyResponse:
        caller = current_caller()
        errors: list[FieldViolation] = []
        if not TENANT_RE.fullmatch(request.tenant):
            errors.append(
                FieldViolation(
                    "tenant", "must be 1-63 characters of [a-z0-9-], starting with a letter or digit"
                )
            )
        if not 0 < len(request.name) <= 200:
            errors.append(FieldViolation("name", "must be 1-200 characters"))
        if not request.scopes:
            errors.append(FieldViolation("scopes", "at least one is required"))
        for i, scope in enumerate(request.scopes):
            if scope not in SCOPES:
                errors.append(
                    FieldViolation(f"scopes[{i}]", f"unknown scope; one of {', '.join(sorted(SCOPES))}")
                )
        if errors:
            raise invalid_argument(errors)
        _own_tenant(caller, request.tenant)
        if OPERATOR_SCOPE in request.scopes:
            require_scope(OPERATOR_SCOPE)  # only an operator makes an operator key
        if not await self._keys.tenant_exists(request.tenant, timeout=deadline_timeout(context)):
            raise StrataError(
                Code.FAILED_PRECONDITION,
                "TENANT_NOT_FOUND",
                f"tenant {request.tenant!r} is not registered; create it with TenantService first",
                metadata={"tenant": request.tenant},
            )
        made = new_api_key(self._pepper)
        row = await self._keys.insert(
            made.key_id,
            request.tenant,
            request.name,
            request.scopes,
            made.secret_hash,
            timeout=deadline_timeout(context),
        )
        return admin_pb2.CreateApiKeyResponse(key=key_message(row), api_key=made.api_key)

    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: Context
    ) -> admin_pb2.ListApiKeysResponse:
        caller = current_caller()
        errors: list[FieldViolation] = []
        if request.tenant and not TENANT_RE.fullmatch(request.tenant):
            errors.append(FieldViolation("tenant", "is not a tenant slug"))
        size = page_size(request.page_size, errors)
        if errors:
            raise invalid_argument(errors)
        # A tenant's admin lists its own tenant's keys ("" means its own, not every tenant's).
        tenant = request.tenant if caller.is_operator else request.tenant or caller.tenant
        _own_tenant(caller, tenant)
        query = ["admin.ListApiKeys", tenant, request.include_revoked]
        after = self._tokens.cursor(request.page_token, query, "")
        rows = await self._keys.page(
            tenant, request.include_revoked, str(after), size + 1, timeout=deadline_timeout(context)
        )
        response = admin_pb2.ListApiKeysResponse(keys=[key_message(r) for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = self._tokens.encode(query, rows[size - 1].key_id)
        return response

    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: Context
    ) -> admin_pb2.RevokeApiKeyResponse:
        caller = current_caller()
        if not _KEY_ID_RE.fullmatch(request.key_id):
            raise invalid_argument([FieldViolation("key_id", "must be 16 hex characters")])
        # Another tenant's key is NOT_FOUND to a tenant's admin, as if it did not exist.
        tenant = None if caller.is_operator else caller.tenant
        row = await self._keys.revoke(request.key_id, tenant, timeout=deadline_timeout(context))
        if row is None:
            raise not_found("API_KEY_NOT_FOUND", "no such API key", key_id=request.key_id)
        return admin_pb2.RevokeApiKeyResponse(key=key_message(row))


def _own_tenant(caller: Caller, tenant: str) -> None:
    """PERMISSION_DENIED unless ``caller`` may manage ``tenant``: an operator any, an admin its own."""
    if not caller.is_operator and tenant != caller.tenant:
        raise StrataError(
            Code.PERMISSION_DENIED,
            "OTHER_TENANT",
            "an admin key manages its own tenant only; another tenant needs an operator key",
            metadata={"tenant": tenant},
        )
