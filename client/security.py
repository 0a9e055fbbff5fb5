"""Client side of the daemon's socket security (CURVE keys for TCP endpoints: issue 7)."""

from __future__ import annotations

from typing import Any


def secure_client_socket(sock: Any, endpoint: str) -> None:
    """Configure ``sock`` before connect; ipc needs nothing (the socket file is owner-only)."""
    return None
