"""Local networking: the one place that picks a free TCP port (process groups, test servers, launches)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just handed out on ``host``; the caller binds it soon (another process may race it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# What a launcher (torchrun, Ray Train, a parent that already joined a group) exports for one process
# group; a process that must form its own world of one clears them first.
TORCH_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
