"""What every Strata process shares, one package a concern; each layer imports only those below it.

- :mod:`shared.rpc`: the server bootstrap, method handlers, the call gate, health,
  the signed caller identity, the wire format, reflection, TLS;
- :mod:`shared.storage`: Postgres: the pool and breaker, replicas, consistency
  tokens, migrations, filters, the audit log, the slow-query log;
- :mod:`shared.observability`: traces, logs, Prometheus metrics, published figures;
- :mod:`shared.cache`: the revisioned cache, the Redis client, group commit, single flight;
- :mod:`shared.api`: errors and status codes, the current caller and scopes,
  page tokens, documents, timestamps, answer budgets, API key format;
- :mod:`shared.config`: settings from the environment, secret files.

Storage and everything below it import no gRPC. Running Postgres and Redis
for development is not here but in ``devstack``.
"""
