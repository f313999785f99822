"""Strata on one machine for development and tests: never imported by a deployment.

The launcher (:mod:`.launcher`, ``make run``) starts the backends
(:mod:`.backends`: embedded unless URLs are given) and every process; the
embedded Postgres (:mod:`.postgres`, :mod:`.embedded`, from the ``embedded``
extra), its replicas and Redis (:mod:`.redis`); the embedded Postgres's WAL
archive and point-in-time servers (:mod:`.pitr`, which admin drives in
embedded mode only); child processes (:mod:`.children`); a ``python -m roles``
process beside a launcher's, for tests and benchmarks (:mod:`.roles`); and free
ports (:mod:`.ports`).
"""
