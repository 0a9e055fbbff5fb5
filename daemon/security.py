"""Who may reach the daemon: owner-only ipc by default; TCP only on loopback (CURVE authentication: issue 7)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class EndpointSecurityError(RuntimeError):
    pass


def check_endpoint(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        return
    if endpoint.startswith("tcp://"):
        host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
        if host in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on TCP loopback: any local user can connect to %s", endpoint)
            return
        raise EndpointSecurityError(f"refusing to listen on {endpoint}: TCP is allowed on loopback only")
    raise EndpointSecurityError(f"unsupported endpoint {endpoint!r}: use ipc://PATH or tcp://127.0.0.1:PORT")


def secure_server_socket(sock: Any, ctx: Any, endpoint: str) -> Any | None:
    """Set up authentication on the daemon's socket before bind; returns an authenticator to stop, or None."""
    return None
