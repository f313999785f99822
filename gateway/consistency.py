"""The newest consistency token of each caller, added to that caller's next calls.

A write's answer carries ``strata-consistency-token`` (the WAL position it
reached, see :mod:`shared.storage.consistency`). The gateway remembers the newest one
per API key and sends it along with every later call of that key, so reads
that a replica may serve see the caller's own writes, with nothing for the
caller to do. A token the caller sends itself travels too; the service uses
the newer of the two.

The memory is this gateway process's: callers spread over several gateways
keep their guarantee only through each one they wrote through (or by passing
the token themselves). It holds at most ``capacity`` keys, least recently used
first out; forgetting a key only sends that caller's next reads to wherever
the service finds fresh enough without a token.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from shared.storage.consistency import TOKEN_KEY, format_lsn, parse_lsn

__all__ = ["CallerTokens"]


class CallerTokens:
    """API key id → newest WAL position its calls were told."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._newest: OrderedDict[str, int] = OrderedDict()
        self._capacity = capacity

    def attach(self, key_id: str, metadata: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``metadata`` for an upstream call of ``key_id``, with its newest token added."""
        lsn = self._newest.get(key_id)
        if lsn is not None:
            self._newest.move_to_end(key_id)
            metadata.append((TOKEN_KEY, format_lsn(lsn)))
        return metadata

    def observe(self, key_id: str, trailing: Iterable[tuple[str, Any]] | None) -> None:
        """Remember the token in an upstream's trailing metadata, if newer than the one held."""
        for key, value in trailing or ():
            if key != TOKEN_KEY:
                continue
            try:
                lsn = parse_lsn(value.decode() if isinstance(value, bytes) else str(value))
            except (ValueError, UnicodeDecodeError):
                continue  # only services set it; a malformed one is ignored, never trusted
            if lsn > self._newest.get(key_id, 0):
                self._newest[key_id] = lsn
                self._newest.move_to_end(key_id)
                while len(self._newest) > self._capacity:
                    self._newest.popitem(last=False)

    def __len__(self) -> int:
        return len(self._newest)
