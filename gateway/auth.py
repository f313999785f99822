"""Turning ``authorization: Bearer <key>`` into a caller, with a short-lived cache.

The admin service owns keys; the gateway asks it (AuthenticateApiKey, signed
as the gateway's internal identity) and remembers the answer, good or bad,
for ``STRATA_KEY_CACHE_TTL_S`` (1 s): a revoked key stops working within that
time, and a flood of calls with one key costs one lookup per second.
Concurrent lookups of one key share one call. A lookup is a client span of
the request that made it, so admin's work on a cache miss joins that trace.

Callers without a valid key cost little and keep nothing: a token that is
not shaped like a key (``sk_<16 hex>_<43 characters>``) is refused before any
lookup or cache entry; refusals are cached apart from good answers, at most
10,000 of them (each keyed by a token of at most 63 characters); and
:class:`FailedAttempts` refuses a peer that keeps failing before it costs a
lookup at all.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import grpc
from strata.internal.v1 import internal_pb2

from gateway.tracing import end_span, upstream_call_span
from gateway.upstreams import Upstream
from shared.api.apikeys import parse_api_key
from shared.api.callers import INTERNAL_SCOPE, Caller
from shared.api.errors import Code, StrataError
from shared.cache.singleflight import SingleFlight
from shared.rpc.identity import sign_caller
from shared.rpc.local import LocalContext, LocalUnary

__all__ = ["FailedAttempts", "KeyResolver", "bearer_token", "missing_scope", "peer_host"]

_AUTH_SERVICE = internal_pb2.DESCRIPTOR.services_by_name["ApiKeyAuthService"].full_name
_AUTHENTICATE_METHOD = "AuthenticateApiKey"
_AUTHENTICATE = f"/{_AUTH_SERVICE}/{_AUTHENTICATE_METHOD}"
GATEWAY_CALLER = Caller("strata-system", frozenset({INTERNAL_SCOPE}), "gateway")
_LOOKUP_TIMEOUT_S = 2.0
_MAX_CACHED = 100_000  # good answers
_MAX_REFUSALS_CACHED = 10_000  # bad ones: anyone can make those
_MAX_PEERS = 10_000  # peers whose failures are counted at once


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

    def __init__(
        self, admin: Upstream, secret: bytes, ttl_s: float, local: Mapping[str, LocalUnary] | None = None
    ) -> None:
        """``local``: the unary handlers of services in this process; with admin's among them,
        keys are checked in-process (:mod:`shared.rpc.local`)."""
        self._admin = admin
        self._local = (local or {}).get(_AUTHENTICATE)
        self._secret = secret
        self._ttl_s = ttl_s
        # token -> (when fetched, the answer); refusals apart, so that junk cannot evict good keys
        self._cache: dict[str, tuple[float, Caller | StrataError]] = {}
        self._refusals: dict[str, tuple[float, Caller | StrataError]] = {}
        self._lookups: SingleFlight[str, Caller | StrataError] = SingleFlight()

    @property
    def ttl_s(self) -> float:
        """How long an answer is remembered: a revoked key may work this long after."""
        return self._ttl_s

    async def resolve(self, token: str, max_age_s: float | None = None) -> Caller:
        """The caller ``token`` speaks for; UNAUTHENTICATED for a bad key.

        An answer older than ``max_age_s`` (default: the cache TTL) is asked again.
        """
        max_age = self._ttl_s if max_age_s is None else min(max_age_s, self._ttl_s)
        cached = self._cache.get(token) or self._refusals.get(token)
        if cached is not None and time.monotonic() - cached[0] < max_age:
            answer = cached[1]
        else:
            # Only well-shaped tokens are ever cached, so a hit needs no shape check.
            if parse_api_key(token) is None:
                raise _MALFORMED.with_traceback(None)
            answer = await self._lookups.do(token, lambda: self._lookup(token))
        if isinstance(answer, StrataError):
            raise answer.with_traceback(None)  # shared: a re-raise would grow its traceback
        return answer

    def known_good(self, token: str) -> bool:
        """Whether ``token`` resolved to a caller within the TTL (no lookup)."""
        cached = self._cache.get(token)
        return cached is not None and time.monotonic() - cached[0] < self._ttl_s

    async def _authenticate(self, token: str) -> internal_pb2.AuthenticateApiKeyResponse:
        """Ask admin who ``token`` is: in-process when admin is here, else in a client span of the
        current request (when tracing)."""
        if self._local is not None:
            request = internal_pb2.AuthenticateApiKeyRequest(api_key=token).SerializeToString()
            asked = LocalContext(GATEWAY_CALLER, (), _LOOKUP_TIMEOUT_S, "in-process")
            return internal_pb2.AuthenticateApiKeyResponse.FromString(await self._local(request, asked))
        call = self._admin.pick().unary_unary(
            _AUTHENTICATE,
            request_serializer=None,  # the bytes the identity is signed for are the bytes sent
            response_deserializer=internal_pb2.AuthenticateApiKeyResponse.FromString,
        )
        request = internal_pb2.AuthenticateApiKeyRequest(api_key=token).SerializeToString()
        metadata = sign_caller(self._secret, _AUTHENTICATE, GATEWAY_CALLER, body=request)
        with upstream_call_span(_AUTH_SERVICE, _AUTHENTICATE_METHOD, metadata) as span:
            try:
                reply: internal_pb2.AuthenticateApiKeyResponse = await call(
                    request, metadata=metadata, timeout=_LOOKUP_TIMEOUT_S
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
                    Code.PERMISSION_DENIED,
                    "TENANT_SUSPENDED",
                    exc.details() or "the tenant is suspended",
                )
            elif exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                # Not an answer about the key: do not cache, tell the caller to retry.
                raise StrataError(
                    Code.UNAVAILABLE,
                    "AUTH_UNAVAILABLE",
                    "API keys cannot be checked right now; retry",
                    retry_delay_s=1.0,
                ) from exc
            else:
                answer = _INVALID
        else:
            answer = Caller(reply.tenant, frozenset(reply.scopes), reply.key_id, tenant_uid=reply.tenant_uid)
        if isinstance(answer, Caller):
            cache, other, bound = self._cache, self._refusals, _MAX_CACHED
        else:
            cache, other, bound = self._refusals, self._cache, _MAX_REFUSALS_CACHED
        other.pop(token, None)  # a token's answer lives in one of the two
        if len(cache) >= bound:
            cache.clear()
        cache[token] = (asked, answer)
        return answer


class FailedAttempts:
    """Failed authentications per peer address, as a token bucket: ``rate_per_s`` refill, ``burst`` deep.

    A peer that has spent its bucket is refused (RESOURCE_EXHAUSTED
    ``TOO_MANY_FAILED_ATTEMPTS``, with a retry delay) before its token is
    looked at, unless the token is a key known good right now. Counted per
    gateway process; at most 10,000 peers are tracked (the least recent go).
    """

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (tokens, when)

    def check(self, peer: str) -> None:
        """Refuse ``peer`` if it has failed too often lately."""
        if self._tokens(peer, time.monotonic()) < 1.0:
            raise StrataError(
                Code.RESOURCE_EXHAUSTED,
                "TOO_MANY_FAILED_ATTEMPTS",
                "too many calls from this address failed to authenticate; wait before trying again",
                retry_delay_s=1.0 / self._rate,
            )

    def failed(self, peer: str) -> None:
        """Count one failed authentication of ``peer``."""
        now = time.monotonic()
        self._buckets[peer] = (self._tokens(peer, now) - 1.0, now)
        self._buckets.move_to_end(peer)
        while len(self._buckets) > _MAX_PEERS:
            self._buckets.popitem(last=False)

    def _tokens(self, peer: str, now: float) -> float:
        tokens, when = self._buckets.get(peer, (self._burst, now))
        return min(self._burst, tokens + (now - when) * self._rate)


def missing_scope(caller: Caller, scope: str) -> StrataError | None:
    """PERMISSION_DENIED ``MISSING_SCOPE`` when ``caller`` lacks ``scope``; None when it has it.

    Asked when a call is admitted and again while a stream stays open.
    """
    if caller.has_scope(scope):
        return None
    return StrataError(
        Code.PERMISSION_DENIED,
        "MISSING_SCOPE",
        f"this API key lacks the {scope!r} scope",
        metadata={"scope": scope},
    )


def peer_host(peer: str) -> str:
    """The address of a gRPC peer string (``ipv4:10.0.0.1:5000`` → ``ipv4:10.0.0.1``), port dropped."""
    host, _, port = peer.rpartition(":")
    return host if host and port.isdigit() else peer


def _unauthenticated(reason: str, message: str) -> StrataError:
    return StrataError(Code.UNAUTHENTICATED, reason, message)


# Shared by every refusal: a cached refusal costs its key and a tuple, not an error of its own.
_INVALID = _unauthenticated("INVALID_API_KEY", "the API key is not valid")
_MALFORMED = _unauthenticated(
    "INVALID_API_KEY", "the API key is not valid: Strata keys read sk_<16 hex>_<43 characters>"
)
