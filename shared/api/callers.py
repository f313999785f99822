"""Who is calling, once verified: the caller, its scopes, and the one bound to the call being handled.

The RPC layer binds the caller it verified (:mod:`shared.rpc.identity`) with
:func:`set_current_caller`; servicers check scopes with :func:`require_scope`
and stores read it for the audit log with :func:`current_caller`.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from shared.api.errors import Code, StrataError

__all__ = [
    "ADMIN_SCOPE",
    "DATA_SCOPES",
    "INTERNAL_SCOPE",
    "OPERATOR_SCOPE",
    "SCOPES",
    "Caller",
    "current_caller",
    "require_scope",
    "set_current_caller",
]

# A tenant's data: what its own keys read and write.
DATA_SCOPES = frozenset(
    {"kv:read", "kv:write", "tenants:read", "tenants:write", "vector:read", "vector:write"}
)
# A tenant's administrator: its own tenant's keys and audit events, and all of its data.
ADMIN_SCOPE = "admin"
# The deployment's operator: tenants, every tenant's keys, backups, restores, branches,
# migrations, caches, record indexes; and everything an admin may do.
OPERATOR_SCOPE = "operator"
# What an API key may carry. "internal" is kept for Strata's own calls.
SCOPES = DATA_SCOPES | {ADMIN_SCOPE, OPERATOR_SCOPE}
INTERNAL_SCOPE = "internal"

_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("strata_caller")


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified caller: its tenant, its scopes and the API key it used."""

    tenant: str
    scopes: frozenset[str]
    key_id: str
    method: str = ""  # the full method the signature was checked for ("" outside a call)
    tenant_uid: str = ""  # the tenant's registry id, where the gateway knows it (never reused, unlike slugs)

    def has_scope(self, scope: str) -> bool:
        """True for ``scope`` itself, or one it implies: ``operator`` every scope but internal,
        ``admin`` every data scope."""
        if scope in self.scopes:
            return True
        if OPERATOR_SCOPE in self.scopes:
            return scope != INTERNAL_SCOPE
        return ADMIN_SCOPE in self.scopes and scope in DATA_SCOPES

    @property
    def is_operator(self) -> bool:
        """Whether this caller may act for every tenant (not only its own)."""
        return self.has_scope(OPERATOR_SCOPE)


def current_caller() -> Caller:
    """The verified caller of the call being handled."""
    try:
        return _caller.get()
    except LookupError:
        raise _unauthenticated("no verified caller") from None


def set_current_caller(caller: Caller) -> contextvars.Token[Caller]:
    """Bind ``caller`` to the call being handled (the server bootstrap does this)."""
    return _caller.set(caller)


def require_scope(scope: str) -> Caller:
    """The current caller, or PERMISSION_DENIED when it lacks ``scope``."""
    caller = current_caller()
    if not caller.has_scope(scope):
        raise StrataError(
            Code.PERMISSION_DENIED,
            "MISSING_SCOPE",
            f"this call needs the {scope!r} scope",
            metadata={"scope": scope},
        )
    return caller


def _unauthenticated(message: str) -> StrataError:
    return StrataError(Code.UNAUTHENTICATED, "UNAUTHENTICATED", message)
