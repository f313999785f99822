"""Traces and JSON logs (:mod:`.telemetry`, Postgres span names in :mod:`.dbspans`), Prometheus
metrics (:mod:`.metrics`) and the figures each process publishes for admin (:mod:`.stats`)."""
