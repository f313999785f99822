"""Ports for servers to listen on: outside the kernel's ephemeral range, never handed out twice."""

from __future__ import annotations

import socket

from devstack.ports import free_port, port_is_free


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(20000 <= port < 32768 for port in ports)
    assert all(port_is_free(port) for port in ports)


def test_a_port_someone_listens_on_is_not_free():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert not port_is_free(sock.getsockname()[1])
