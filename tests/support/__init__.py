"""What tests share, each thing once.

- ``stack``: real Strata processes (the launcher, one more gateway or service);
- ``calls``: a key's metadata, the error a call ends with, INVALID_ARGUMENT checks;
- ``errors``: a gRPC error's Status, ErrorInfo and BadRequest;
- ``documents``: Structs and filters, as messages or in their JSON form;
- ``waiting``: ``eventually``;
- ``models``: hypothesis state machines run against a gateway;
- ``pki``, ``otlp``, ``protowire``, ``redis_cluster``, ``replicas``,
  ``linearizability``, ``minilm``: certificates, a trace receiver, the
  protobuf wire format, a Redis Cluster, streaming replicas, a
  linearizability checker, real sentence embeddings.
"""
