"""Postgres: the pool, breaker and deadlines (:mod:`.db`), read replicas (:mod:`.replicas`),
consistency tokens (:mod:`.consistency`), migrations and their command (:mod:`.migrations`,
:mod:`.migrate`), the filter language as SQL (:mod:`.filters`), the audit log (:mod:`.audit`), the
slow-query log (:mod:`.slowlog`), and a service's database from its settings (:mod:`.service_db`).
No gRPC here."""
