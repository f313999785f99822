"""Turning ``authorization: Bearer <key>`` into a caller, with a short-lived cache.

The admin service owns keys; the gateway asks it (AuthenticateApiKey, signed
as the gateway's internal identity) and remembers the answer, good or bad,
for ``STRATA_KEY_CACHE_TTL_S`` (1 s): a revoked key stops working within that
time, and a flood of calls with one key costs one lookup per second.
Concurrent lookups of one key share one call. A lookup is a client span of
the request that made it, so admin's work on a cache miss joins that trace.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
from strata.admin.v1 import admin_pb2

from gateway.tracing import end_span, upstream_call_span
from gateway.upstreams import Upstream
from shared.errors import StrataError
from shared.identity import INTERNAL_SCOPE, Caller, sign_caller

__all__ = ["KeyResolver", "bearer_token"]

_ADMIN_SERVICE = "strata.admin.v1.AdminService"
_AUTHENTICATE_METHOD = "AuthenticateApiKey"
_AUTHENTICATE = f"/{_ADMIN_SERVICE}/{_AUTHENTICATE_METHOD}"
GATEWAY_CALLER = Caller("strata-system", frozenset({INTERNAL_SCOPE}), "gateway")
_MAX_CACHED = 100_000


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    """The token of the ``authorization: Bearer`` header; UNAUTHENTICATED when absent."""
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            break
    raise _unauthenticated("MISSING_API_KEY", "send 'authorization: Bearer <api key>'")


class KeyResolver:
    """Resolves API keys through the admin service, caching answers for ``ttl_s``."""

    def __init__(self, admin: Upstream, secret: bytes, ttl_s: float) -> None:
        self._admin = admin
        self._secret = secret
        self._ttl_s = ttl_s
        # token -> (when fetched, the answer)
        self._cache: dict[str, tuple[float, Caller | StrataError]] = {}
        self._inflight: dict[str, asyncio.Future[Caller | StrataError]] = {}

    @property
    def ttl_s(self) -> float:
        """How long an answer is remembered: a revoked key may work this long after."""
        return self._ttl_s

    async def resolve(self, token: str, max_age_s: float | None = None) -> Caller:
        """The caller ``token`` speaks for; UNAUTHENTICATED for a bad key.

        An answer older than ``max_age_s`` (default: the cache TTL) is asked again.
        """
        max_age = self._ttl_s if max_age_s is None else min(max_age_s, self._ttl_s)
        cached = self._cache.get(token)
        if cached is not None and time.monotonic() - cached[0] < max_age:
            answer = cached[1]
        else:
            waiting = self._inflight.get(token)
            if waiting is None:
                waiting = asyncio.ensure_future(self._lookup(token))
                self._inflight[token] = waiting
                waiting.add_done_callback(lambda _: self._inflight.pop(token, None))
            answer = await asyncio.shield(waiting)
        if isinstance(answer, StrataError):
            raise answer
        return answer

    async def _authenticate(self, token: str) -> admin_pb2.AuthenticateApiKeyResponse:
        """Ask admin who ``token`` is, in a client span of the current request (when tracing)."""
        call = self._admin.pick().unary_unary(
            _AUTHENTICATE,
            request_serializer=admin_pb2.AuthenticateApiKeyRequest.SerializeToString,
            response_deserializer=admin_pb2.AuthenticateApiKeyResponse.FromString,
        )
        metadata = sign_caller(self._secret, _AUTHENTICATE, GATEWAY_CALLER)
        with upstream_call_span(_ADMIN_SERVICE, _AUTHENTICATE_METHOD, metadata) as span:
            try:
                reply: admin_pb2.AuthenticateApiKeyResponse = await call(
                    admin_pb2.AuthenticateApiKeyRequest(api_key=token), metadata=metadata, timeout=2.0
                )
            except grpc.aio.AioRpcError as exc:
                end_span(span, exc.code(), client=True)
                raise
            end_span(span, grpc.StatusCode.OK, client=True)
            return reply

    async def _lookup(self, token: str) -> Caller | StrataError:
        asked = time.monotonic()  # the answer is as old as the question
        try:
            reply = await self._authenticate(token)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                # A valid key of a suspended tenant: an answer, cached like any other.
                answer: Caller | StrataError = StrataError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "TENANT_SUSPENDED",
                    exc.details() or "the tenant is suspended",
                    domain="strata.gateway",
                )
            elif exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                # Not an answer about the key: do not cache, tell the caller to retry.
                raise StrataError(
                    grpc.StatusCode.UNAVAILABLE,
                    "AUTH_UNAVAILABLE",
                    "API keys cannot be checked right now; retry",
                    retry_delay_s=1.0,
                ) from exc
            else:
                answer = _unauthenticated("INVALID_API_KEY", "the API key is not valid")
        else:
            answer = Caller(reply.tenant, frozenset(reply.scopes), reply.key_id, tenant_uid=reply.tenant_uid)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[token] = (asked, answer)
        return answer


def _unauthenticated(reason: str, message: str) -> StrataError:
    return StrataError(grpc.StatusCode.UNAUTHENTICATED, reason, message, domain="strata.gateway")
