"""Strata on one machine for development and tests: never imported by a deployment.

The launcher (:mod:`.launcher`, ``make run``) starts the backends
(:mod:`.backends`: embedded unless URLs are given) and every process; the
embedded Postgres, its replicas and Redis (:mod:`.embedded`, from the
``embedded`` extra), the embedded Postgres's WAL archive and point-in-time
servers (:mod:`.pitr`, which admin drives in embedded mode only), and free
ports (:mod:`.ports`).
"""
