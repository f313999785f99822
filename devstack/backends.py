"""Postgres and Redis for a Strata deployment: embedded or external, migrated.

:func:`open_backends` is the one place that decides the run mode. With no
``DATABASE_URL``/``REDIS_URL`` it starts the embedded servers under the data
folder; otherwise it uses the given servers and starts nothing. Either way it
applies every service's pending migrations before returning the URLs the
services connect with. Embedded, it then starts ``STRATA_EMBEDDED_REPLICAS``
streaming replicas of the migrated primary, whose service URLs are the read
URLs (external: ``DATABASE_READ_URLS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from devstack.embedded import EmbeddedPostgres, EmbeddedReplica, prepare_database
from devstack.redis import EmbeddedRedis
from shared.config.settings import Settings
from shared.storage.migrations import migrate

__all__ = ["Backends", "open_backends"]


@dataclass(slots=True)
class Backends:
    """The URLs services use, and the embedded servers when this process started them."""

    database_url: str
    migrate_database_url: str
    redis_url: str
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    replicas: list[EmbeddedReplica] = field(default_factory=list)
    database_read_urls: tuple[str, ...] = ()  # streaming replicas, as the service role

    def close(self) -> None:
        """Stop the embedded servers (external ones are left alone), the replicas before their primary."""
        for replica in self.replicas:
            replica.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()


async def open_backends(settings: Settings, services: tuple[str, ...]) -> Backends:
    """Start (embedded) or reach (external) Postgres and Redis, and migrate."""
    if settings.embedded:
        postgres = EmbeddedPostgres(settings.data_dir, settings.embedded_pg_port)
        redis = EmbeddedRedis(settings.data_dir, settings.embedded_redis_port)
        try:
            urls = postgres.start()
            await prepare_database(urls.owner, urls.service)
            backends = Backends(urls.service, urls.owner, redis.start(), postgres, redis)
        except BaseException:
            redis.stop()
            postgres.stop()
            raise
    else:
        backends = Backends(
            settings.database_url,
            settings.migrate_database_url,
            settings.redis_url,
            database_read_urls=settings.database_read_urls,
        )
    try:
        await migrate(backends.migrate_database_url, backends.database_url, services)
        if backends.postgres is not None:
            _start_replicas(backends, backends.postgres, settings.embedded_replicas)
    except BaseException:
        backends.close()
        raise
    return backends


def _start_replicas(backends: Backends, primary: EmbeddedPostgres, count: int) -> None:
    # After the migrations, so each copy starts with the schema; one at a time,
    # each in ``backends`` before it starts so that a failure part-way stops the others.
    urls: list[str] = []
    for number in range(1, count + 1):
        replica = EmbeddedReplica(primary.data_dir, primary.port, number)
        backends.replicas.append(replica)
        urls.append(replica.start().service)
    backends.database_read_urls = tuple(urls)
    primary.retire_replicas(keep=count)
