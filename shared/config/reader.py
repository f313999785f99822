"""Single environment variables parsed and bounded, each error naming the variable."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

__all__ = ["ConfigError", "EnvReader"]


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class EnvReader:
    """Parses single variables, raising ConfigError that names the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _raw(self, name: str) -> str | None:
        value = self._env.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer") from None
        if not low <= value <= high:
            raise ConfigError(f"{name}={value} is out of range [{low}, {high}]")
        return value

    def port(self, name: str, default: int) -> int:
        return self.integer(name, default, 1, 65535)

    def number(self, name: str, default: float, low: float, high: float = math.inf) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if not math.isfinite(value) or not low <= value <= high:
            bounds = f">= {low}" if math.isinf(high) else f"in [{low}, {high}]"
            raise ConfigError(f"{name}={raw} must be a finite number {bounds}")
        return value

    def url(self, name: str, problem: Callable[[str], str | None]) -> str:
        """The URL in ``name``, or ""; ``problem`` says what is wrong with it (never quoting it)."""
        raw = self._raw(name)
        if raw is None:
            return ""
        found = problem(raw)
        if found:
            raise ConfigError(f"{name} {found}")
        return raw

    def urls(self, name: str, problem: Callable[[str], str | None]) -> tuple[str, ...]:
        """The comma-separated URLs in ``name``, each checked as :meth:`url` does."""
        raw = self._raw(name)
        if raw is None:
            return ()
        found = tuple(u.strip() for u in raw.split(",") if u.strip())
        for position, url in enumerate(found, 1):
            if issue := problem(url):
                raise ConfigError(f"{name}: URL {position} {issue}")
        return found

    def addresses(self, name: str) -> tuple[str, ...]:
        raw = self._raw(name)
        if raw is None:
            return ()
        found = tuple(a.strip() for a in raw.split(",") if a.strip())
        for address in found:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"{name}: {address!r} is not host:port")
        return found

    def existing_file(self, name: str) -> str:
        raw = self._raw(name)
        if raw is None:
            return ""
        if not os.path.isfile(raw):
            raise ConfigError(f"{name}={raw!r} is not a readable file")
        return raw

    def subset(self, name: str, choices: tuple[str, ...], everything: str = "all") -> tuple[str, ...]:
        """A comma-separated subset of ``choices``, in their order (``everything``, or unset: all of
        them); ConfigError for an unknown, repeated or empty list."""
        raw = self._raw(name)
        if raw is None or raw.casefold() == everything:
            return choices
        named = [part.strip().casefold() for part in raw.split(",")]
        unknown = [part for part in named if part not in choices]
        if unknown or not all(named) or len(set(named)) != len(named):
            raise ConfigError(
                f"{name}={raw!r} must be {everything!r} or a comma-separated list of {', '.join(choices)}, "
                "each once"
            )
        return tuple(choice for choice in choices if choice in named)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        """One of ``choices`` (matched ignoring case, returned as spelled there), or ``default``."""
        raw = self._raw(name)
        if raw is None:
            return default
        for choice in choices:
            if raw.casefold() == choice.casefold():
                return choice
        raise ConfigError(f"{name}={raw!r} must be one of {', '.join(choices)}")
