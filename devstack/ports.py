"""Loopback TCP ports: a free one to listen on, or whether a given one is free."""

from __future__ import annotations

import random
import socket

__all__ = ["free_port", "port_is_free"]

# Below Linux's default ephemeral range (32768-60999): the kernel's own pick
# (bind to port 0) comes from that range, where any outgoing connection may take
# it as its source port before the server that was promised it binds.
_LISTEN_PORTS = range(20000, 32768)
_handed_out: set[int] = set()  # never the same port twice from one process


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a server about to listen on it."""
    for _ in range(1000):
        port = random.choice(_LISTEN_PORTS)
        if port not in _handed_out and port_is_free(port):
            _handed_out.add(port)
            return port
    raise OSError("no free port to listen on in 20000-32767")


def port_is_free(port: int, *, reuse_address: bool = False) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 right now.

    ``reuse_address``: bind as servers such as Postgres do (SO_REUSEADDR), for
    which a port whose old connections are in TIME_WAIT is free.
    """
    with socket.socket() as sock:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
