"""The gRPC layer: the server bootstrap (:mod:`.server`), method handlers (:mod:`.handlers`), the
call gate (:mod:`.callgate`), health (:mod:`.health`), the signed caller identity (:mod:`.identity`),
undecodable requests (:mod:`.wireformat`), reflection (:mod:`.reflection`), TLS (:mod:`.tls`) and
the container health check (:mod:`.healthcheck`)."""
