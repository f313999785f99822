"""Who is calling: the caller identity the gateway signs and every service verifies.

The gateway authenticates an API key, then forwards the key's tenant and
scopes to the service in ``x-strata-*`` metadata with an HMAC-SHA256
signature over the method, the identity, a timestamp and the SHA-256 of the
request body it forwards, keyed by the secret that gateway and services share
(``STRATA_INTERNAL_SECRET``). A service accepts a call only with a valid
signature, at most ``STRATA_IDENTITY_MAX_AGE_S`` old, for that very method and
the very body it received (it hashes the bytes itself), so a caller that
reaches a service port directly cannot pose as any tenant, and an identity
seen on the wire cannot carry another request. A client stream (an upload)
is signed for "a stream": its messages are not known when it starts.

The verified caller is bound to the call with
:func:`shared.api.callers.set_current_caller`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from typing import Any

import grpc

from shared.api.callers import Caller
from shared.api.errors import Code, StrataError

__all__ = ["INTERNAL_PREFIX", "sign_caller", "signing_interceptors", "verify_caller"]

INTERNAL_PREFIX = "x-strata-"
_TENANT = "x-strata-tenant"
_SCOPES = "x-strata-scopes"
_KEY_ID = "x-strata-key-id"
_TENANT_UID = "x-strata-tenant-uid"
_TIMESTAMP = "x-strata-ts"
_SIGNATURE = "x-strata-signature"
_MAX_AGE_S = 10.0  # the default of STRATA_IDENTITY_MAX_AGE_S: clock skew and one hop, no more
_STREAM_BODY = "stream"  # what a client stream is signed for


def _payload(
    method: str, tenant: str, tenant_uid: str, scopes: str, key_id: str, timestamp: str, body: bytes | None
) -> bytes:
    digest = _STREAM_BODY if body is None else hashlib.sha256(body).hexdigest()
    fields = ("strata-caller-v3", method, tenant, tenant_uid, scopes, key_id, timestamp, digest)
    return "\n".join(fields).encode()


def sign_caller(
    secret: bytes, method: str, caller: Caller, now: float | None = None, *, body: bytes | None
) -> list[tuple[str, str]]:
    """The metadata that carries ``caller`` to a service for a call of ``method`` with request ``body``
    (the serialized request, exactly as sent; None for a client stream)."""
    scopes = ",".join(sorted(caller.scopes))
    timestamp = f"{time.time() if now is None else now:.3f}"
    signature = hmac.new(
        secret,
        _payload(method, caller.tenant, caller.tenant_uid, scopes, caller.key_id, timestamp, body),
        hashlib.sha256,
    ).hexdigest()
    signed = [
        (_TENANT, caller.tenant),
        (_SCOPES, scopes),
        (_KEY_ID, caller.key_id),
        (_TIMESTAMP, timestamp),
        (_SIGNATURE, signature),
    ]
    if caller.tenant_uid:  # absent rather than empty (some clients refuse empty header values)
        signed.append((_TENANT_UID, caller.tenant_uid))
    return signed


def verify_caller(
    secret: bytes,
    method: str,
    metadata: Iterable[tuple[str, str | bytes]],
    now: float | None = None,
    *,
    body: bytes | None,
    max_age_s: float = _MAX_AGE_S,
) -> Caller:
    """The caller signed into ``metadata`` for ``method`` and request ``body`` (None: a client stream);
    UNAUTHENTICATED unless valid and at most ``max_age_s`` old."""
    fields: dict[str, str] = {}
    for key, value in metadata:
        if key.startswith(INTERNAL_PREFIX) and isinstance(value, str):
            fields[key] = value
    if _SIGNATURE not in fields:
        raise _unauthenticated("the call carries no signed caller; call through the gateway")
    try:
        tenant, scopes, key_id, timestamp = (fields[k] for k in (_TENANT, _SCOPES, _KEY_ID, _TIMESTAMP))
        age = (time.time() if now is None else now) - float(timestamp)
    except (KeyError, ValueError):
        raise _unauthenticated("the signed caller metadata is incomplete") from None
    tenant_uid = fields.get(_TENANT_UID, "")  # signed: dropping or editing it breaks the signature
    expected = hmac.new(
        secret, _payload(method, tenant, tenant_uid, scopes, key_id, timestamp, body), hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(expected, fields[_SIGNATURE]):
        raise _unauthenticated("the caller signature is not valid (for this method and request)")
    if not -max_age_s <= age <= max_age_s:
        raise _unauthenticated("the caller signature has expired")
    return Caller(tenant, frozenset(s for s in scopes.split(",") if s), key_id, method, tenant_uid)


class _Signing:
    def __init__(self, secret: bytes, caller: Caller) -> None:
        self._secret = secret
        self._caller = caller

    def _signed(self, details: Any, body: bytes | None) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = [*(details.metadata or ()), *sign_caller(self._secret, method, self._caller, body=body)]
        return details._replace(metadata=metadata)


def _serialized(request: Any) -> bytes:
    # Raw multicallables send bytes as they are; stubs serialize the message as here.
    return request if isinstance(request, bytes) else bytes(request.SerializeToString())


class _SignUnary(_Signing, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._signed(details, _serialized(request)), request)


class _SignServerStream(_Signing, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._signed(details, _serialized(request)), request)


class _SignClientStream(_Signing, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._signed(details, None), requests)


def signing_interceptors(secret: bytes, caller: Caller) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that sign every call of a channel as ``caller``, for its very request
    (what Strata's own processes use to call each other; the gateway signs its raw bytes itself).

    Three objects: grpc.aio files an interceptor under one kind only.
    """
    return [_SignUnary(secret, caller), _SignServerStream(secret, caller), _SignClientStream(secret, caller)]


def _unauthenticated(message: str) -> StrataError:
    return StrataError(Code.UNAUTHENTICATED, "UNAUTHENTICATED", message)
