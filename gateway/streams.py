"""The server streams the gateway holds open: counted, and re-authenticated while they last.

A stream is admitted like any call, then bound to what its key resolved to:
the key id, the tenant's slug and the tenant's registry id (a slug can be
reused after a delete; the id cannot). While the stream is open, the key is
resolved again every half key-cache TTL with an answer no older than that, so
a revoked key, a suspended or deleted tenant, or a tenant replaced under the
same slug ends the stream within the TTL (``STRATA_KEY_CACHE_TTL_S``), with
the status a new call would get (UNAUTHENTICATED or PERMISSION_DENIED). All
streams of one key share each lookup.

Limits (RESOURCE_EXHAUSTED ``TOO_MANY_STREAMS`` past them, naming which):
streams per API key, per tenant, and in all for this gateway process. The
whole-process limit also sizes the connections streams travel on (see
gateway.upstreams), which are never the ones unary calls use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

from gateway.auth import KeyResolver, missing_scope
from shared.api.callers import Caller
from shared.api.errors import Code, StrataError

__all__ = ["OpenStream", "OpenStreams"]

_log = logging.getLogger(__name__)
# With no key cache (TTL 0) every check is a lookup: this often, then.
_MIN_CHECK_INTERVAL_S = 0.25
# How long admin may be unreachable before an open stream is ended (UNAVAILABLE: resume later).
_UNCHECKED_GRACE_S = 5.0


class OpenStream:
    """One admitted server stream: ``ended`` is set, with the reason, when it must stop."""

    def __init__(self, token: str, caller: Caller, scope: str) -> None:
        self.token = token
        self.caller = caller
        self.scope = scope  # what the method needs
        self.ended = asyncio.Event()
        self.reason: StrataError | None = None
        self.checked_at = time.monotonic()

    def end(self, reason: StrataError) -> None:
        if self.reason is None:
            self.reason = reason
            self.ended.set()


class OpenStreams:
    """Admission and re-authentication of the gateway's server streams."""

    def __init__(self, keys: KeyResolver, per_key: int, per_tenant: int, total: int) -> None:
        self._keys = keys
        self._per_key = per_key
        self._per_tenant = per_tenant
        self._total = total
        self._open: set[OpenStream] = set()
        self._by_key: Counter[str] = Counter()
        self._by_tenant: Counter[str] = Counter()
        self._interval_s = keys.ttl_s / 2 if keys.ttl_s > 0 else _MIN_CHECK_INTERVAL_S
        self._task: asyncio.Task[None] | None = None

    def open(self, token: str, caller: Caller, scope: str) -> OpenStream:
        """Count a stream of a method needing ``scope`` in for ``caller``, or RESOURCE_EXHAUSTED."""
        for limit, held, per, what in (
            (self._per_key, self._by_key[caller.key_id], "api_key", "this API key"),
            (self._per_tenant, self._by_tenant[caller.tenant], "tenant", f"tenant {caller.tenant!r}"),
            (self._total, len(self._open), "gateway", "this gateway"),
        ):
            if held >= limit:
                raise StrataError(
                    Code.RESOURCE_EXHAUSTED,
                    "TOO_MANY_STREAMS",
                    f"{what} already holds {limit} open streams; close one first",
                    metadata={"limit": str(limit), "per": per},
                )
        stream = OpenStream(token, caller, scope)
        self._open.add(stream)
        self._by_key[caller.key_id] += 1
        self._by_tenant[caller.tenant] += 1
        if self._task is None:
            self._task = asyncio.create_task(self._recheck_forever(), name="gateway-stream-recheck")
        return stream

    def close(self, stream: OpenStream) -> None:
        """Count ``stream`` out (idempotent)."""
        if stream in self._open:
            self._open.discard(stream)
            for counter, name in (
                (self._by_key, stream.caller.key_id),
                (self._by_tenant, stream.caller.tenant),
            ):
                counter[name] -= 1
                if counter[name] <= 0:
                    del counter[name]

    async def recheck(self) -> None:
        """Resolve the key of every open stream again (once per key) and end those no longer allowed."""
        by_token: dict[str, list[OpenStream]] = {}
        for stream in self._open:
            by_token.setdefault(stream.token, []).append(stream)
        answers = await asyncio.gather(
            *(self._keys.resolve(token, self._interval_s) for token in by_token), return_exceptions=True
        )
        now = time.monotonic()
        for streams, answer in zip(by_token.values(), answers, strict=True):
            for stream in streams:
                verdict = _verdict(stream, answer, now)
                if verdict is not None:
                    stream.end(verdict)
                elif not isinstance(answer, BaseException):
                    stream.checked_at = now

    async def _recheck_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.recheck()
            except Exception:  # a bug here must not stop every later check
                _log.exception("re-checking open streams failed")

    async def close_all(self) -> None:
        """Stop re-checking (at shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _verdict(stream: OpenStream, answer: Caller | BaseException, now: float) -> StrataError | None:
    """Why ``stream`` must end given its key's new ``answer``, or None while it may go on."""
    if isinstance(answer, StrataError) and answer.code != Code.UNAVAILABLE:
        return answer  # revoked, unknown, suspended: what a new call would be told
    if isinstance(answer, BaseException):  # admin unreachable: no answer about the key
        if now - stream.checked_at < _UNCHECKED_GRACE_S:
            return None
        return StrataError(
            Code.UNAVAILABLE,
            "AUTH_UNAVAILABLE",
            "the API key could not be checked again; open the stream again later",
            retry_delay_s=1.0,
        )
    bound = stream.caller
    if (answer.key_id, answer.tenant, answer.tenant_uid) != (bound.key_id, bound.tenant, bound.tenant_uid):
        return StrataError(
            Code.PERMISSION_DENIED,
            "TENANT_REPLACED",
            f"tenant {bound.tenant!r} of this stream was deleted and created again; open it again",
            metadata={"tenant": bound.tenant},
        )
    return missing_scope(answer, stream.scope)
