"""Hostile input, through the gateway and straight to each service port, for every RPC.

Every method comes from the generated descriptors, so a new RPC is covered
without touching this package. What is sent, and what must come back:

- bodies that are no request at all (random bytes, cut-off requests, strings
  that are not UTF-8: lone surrogates, overlong forms): INVALID_ARGUMENT
  from the server bootstrap's own decoding, naming the field that is not
  UTF-8, or ``request`` for bytes malformed otherwise;
- broken gRPC framing at the HTTP/2 level (``nghttp``): grpc's own statuses;
- messages over the receive limit: RESOURCE_EXHAUSTED, nothing written;
- SQL and glob metacharacters, NULs, odd Unicode and very long strings in
  every string field (map and JSON keys, JSON values, field masks, nested
  messages included), extreme numbers in every numeric field: OK or a clear
  status (an expected code with an ErrorInfo), never UNKNOWN or INTERNAL;
- forged caller identities straight to the services: UNAUTHENTICATED;
- malformed, revoked and suspended keys at the gateway;
- another tenant's, edited and forged page tokens;
- filters and JSON documents nested far beyond every limit.

Everything runs as a throwaway tenant (the attacker) beside a victim tenant
that owns the same names; no answer to the attacker may carry the victim's
data, and the victim's rows, like every other row in the database, must come
out unchanged. The ``hostile`` fixture's teardown (conftest.py) checks those
rows, and that every process survived, once the package's last test is done,
and prints one line: calls made, statuses seen, processes that crashed, rows
changed.

Where things are:

- ``names.py``: the tenants' names and the marks in their data;
- ``rpcs.py``: every RPC from the descriptors, a benign request for each, the
  slots hostile values go into, and the hostile strings;
- ``wire.py``: hand-encoded protobuf (deep filters and JSON);
- ``stage.py``: making raw calls and judging their outcome, the ``Hostile`` stage;
- ``database.py``: the digest of every row the unchanged-rows check compares;
- ``conftest.py``: the ``hostile`` fixture (seeding, the final check, cleanup);
- ``test_*.py``: one module per kind of hostile input above.
"""
