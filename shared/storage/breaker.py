"""The circuit breaker in front of a Postgres server (the primary, each replica)."""

from __future__ import annotations

import time

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; lets one probe through after ``cooldown_s``."""

    def __init__(self, threshold: int = 5, cooldown_s: float = 1.0) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.failures = 0
        self._opened_at = 0.0

    @property
    def state(self) -> str:
        """ "closed", "open" or "half-open"."""
        if self.failures < self.threshold:
            return "closed"
        return "half-open" if time.monotonic() - self._opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        """Whether a call may go through now."""
        if self.state != "open":
            return True
        return False

    def record_success(self) -> None:
        self.failures = 0

    def record_failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self._opened_at = time.monotonic()

    def trip(self) -> None:
        """Open now, whatever the count (a condition worse than any one failure was seen)."""
        self.failures = max(self.failures, self.threshold)
        self._opened_at = time.monotonic()
