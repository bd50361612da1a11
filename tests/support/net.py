"""Loopback ports for tests: several free ones that differ, and one that refuses connections."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` different TCP ports of ``host``, free right now (another process may still take
    one). Two calls of a one-port helper may give the same port twice: the sockets here are
    bound together and released together."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextmanager
def refused_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP port of ``host`` that refuses every connection while the block runs: it is bound
    and never listened on, so no server (the test's own included) can take it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])
