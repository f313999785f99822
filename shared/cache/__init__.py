"""Redis and what is built on it: the revisioned two-tier cache (:mod:`.revisioned`), the one Redis
client factory (:mod:`.redisclient`), group commit (:mod:`.groupcommit`) and single flight
(:mod:`.singleflight`). No gRPC here."""
