"""Local networking: the one place that picks a free TCP port (process groups, test servers, launches)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just handed out on ``host``; the caller binds it soon (another process may race it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
