"""Who is on the stage: the tenants' names, the marks written into their data, the attacker's identity."""

from __future__ import annotations

import uuid

from shared.api.callers import INTERNAL_SCOPE, SCOPES, Caller

# The attacker tenant's slug is also the name of everything it owns (namespace,
# collection, record and point id, branch name): valid for each of them.
NAME = f"hq{uuid.uuid4().hex[:8]}"
VICTIM = f"hv{uuid.uuid4().hex[:8]}"
SUSPENDED = f"hs{uuid.uuid4().hex[:8]}"
REVOKED = f"hr{uuid.uuid4().hex[:8]}"
# Written into each tenant's values, documents, payloads and collection names,
# so an answer carrying the other tenant's data is recognisable as bytes.
ATTACKER_MARK = f"attacker-{uuid.uuid4().hex[:12]}"
VICTIM_MARK = f"victim-{uuid.uuid4().hex[:12]}"
THROWAWAY = (NAME, SUSPENDED, REVOKED)
ATTACKER = Caller(NAME, frozenset(SCOPES | {INTERNAL_SCOPE}), "hostile-suite")
DIMENSION = 2
