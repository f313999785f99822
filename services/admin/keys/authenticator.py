"""``strata.internal.v1.ApiKeyAuthService``: who a presented API key speaks for, asked by the gateway."""

from __future__ import annotations

from strata.internal.v1 import internal_pb2

from services.admin.keys.store import ApiKeyStore
from shared.api.apikeys import parse_api_key, secrets_match
from shared.api.errors import Code, StrataError
from shared.rpc.handlers import Context
from shared.storage.db import deadline_timeout

__all__ = ["ApiKeyAuthServicer"]

SUSPENDED = 2  # strata.tenants.v1.TenantStatus


class ApiKeyAuthServicer:
    """Checks presented keys against admin.api_keys (peppered hashes, compared in constant time)."""

    def __init__(self, keys: ApiKeyStore, pepper: bytes) -> None:
        self._keys = keys
        self._pepper = pepper

    async def AuthenticateApiKey(
        self, request: internal_pb2.AuthenticateApiKeyRequest, context: Context
    ) -> internal_pb2.AuthenticateApiKeyResponse:
        parsed = parse_api_key(request.api_key)
        row = None
        if parsed is not None:
            row = await self._keys.find_for_authentication(parsed[0], timeout=deadline_timeout(context))
        if row is None or parsed is None or not secrets_match(self._pepper, parsed[1], row.secret_hash):
            raise StrataError(Code.UNAUTHENTICATED, "INVALID_API_KEY", "the API key is not valid")
        if row.tenant_status is None:
            raise StrataError(
                Code.UNAUTHENTICATED,
                "INVALID_API_KEY",
                "the key's tenant no longer exists",
            )
        if row.tenant_status == SUSPENDED:
            raise StrataError(
                Code.PERMISSION_DENIED,
                "TENANT_SUSPENDED",
                f"tenant {row.tenant!r} is suspended",
                metadata={"tenant": row.tenant},
            )
        return internal_pb2.AuthenticateApiKeyResponse(
            key_id=row.key_id,
            tenant=row.tenant,
            scopes=row.scopes,
            tenant_uid=str(row.tenant_uid),
        )
