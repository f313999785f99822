"""Loopback TCP ports: one the kernel says is free, or whether a given one is."""

from __future__ import annotations

import socket

__all__ = ["free_port", "port_is_free"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
