"""``python -m shared.storage.migrate``: apply pending migrations to an external database and exit.

For deployments that run each service in its own container (see
docker-compose.yml): run this once before the services start. Needs
``DATABASE_URL`` and ``REDIS_URL`` (external mode) and, for an owner role
other than the services', ``STRATA_MIGRATE_DATABASE_URL``.
"""

from __future__ import annotations

import asyncio
import sys

from shared.config.settings import ConfigError, load_settings
from shared.observability.logs import configure_logging
from shared.storage.migrations import migrate


def main() -> None:
    """Migrate, print what each schema is at, exit 0 (2 on a configuration error)."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"strata-migrate: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.embedded:
        print(
            "strata-migrate: set DATABASE_URL and REDIS_URL; `make run` migrates the embedded database",
            file=sys.stderr,
        )
        raise SystemExit(2)
    configure_logging("migrate", settings.log_level)
    asyncio.run(migrate(settings.migrate_database_url, settings.database_url))
    print("strata-migrate: up to date", flush=True)


if __name__ == "__main__":
    main()
