"""Who may reach the daemon.

- ``ipc://`` (the default): the socket file is created owner-only in a 0700 directory (see ``daemon.main`` and
  ``client.paths.ensure_private_dir``); the kernel refuses every other Unix user. Nothing to do here.
- ``tcp://``: any local user can connect to a TCP port, so the daemon speaks ZeroMQ CURVE: traffic is encrypted and
  only clients whose public key is in ``keys/authorized/`` get through (a ZAP handler checks each handshake).
  ``--insecure-loopback`` turns CURVE off, and is refused for anything but a loopback host.

Keys are made with ``sottovoce keys generate`` (see ``keys_cli``); their files are described in
``sottovoce.client.security``.

The ZAP handler is pyzmq's ``AsyncioAuthenticator``: the daemon's ROUTER socket is owned by the asyncio IO thread,
and the authenticator's ZAP socket is polled by a task on that same loop, so no extra thread touches sockets. (A
``ThreadAuthenticator`` would add a thread and an inproc pipe for no gain here.) The allow-list is read again at
every handshake, so ``sottovoce keys authorize`` takes effect without restarting the daemon.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from sottovoce.client import security as cs

log = logging.getLogger(__name__)

ZAP_DOMAIN = "sottovoce"


class EndpointSecurityError(RuntimeError):
    pass


def check_endpoint(endpoint: str, *, insecure_loopback: bool = False) -> None:
    """Refuse endpoints the daemon must not listen on; called before anything is bound.

    ipc is always fine (its directory is checked separately). tcp needs CURVE keys (server keypair and an allow-list
    folder), except with ``insecure_loopback`` on a loopback host.
    """
    if endpoint.startswith("ipc://"):
        if insecure_loopback:
            log.warning("--insecure-loopback has no effect on an ipc endpoint")
        return
    host = cs.tcp_host(endpoint)
    if host is None:
        raise EndpointSecurityError(f"unsupported endpoint {endpoint!r}: use ipc://PATH or tcp://HOST:PORT")
    if insecure_loopback:
        if not cs.is_loopback_host(host):
            raise EndpointSecurityError(
                f"refusing --insecure-loopback on {endpoint}: it is allowed only on a loopback host "
                "(127.0.0.1, ::1, localhost); other hosts need CURVE keys (`sottovoce keys generate`)"
            )
        log.warning("listening on %s WITHOUT CURVE (--insecure-loopback): any local user can connect", endpoint)
        return
    try:
        _server_keys()
        _authorized_dir()
    except cs.KeyFileError as exc:
        raise EndpointSecurityError(
            f"refusing to listen on {endpoint} without CURVE: {exc}. Run `sottovoce keys generate` "
            "(or, on a loopback host only, pass --insecure-loopback)"
        ) from None
    if not cs.is_loopback_host(host):
        log.warning("listening on %s beyond loopback: only CURVE-authorized clients get in", endpoint)


def secure_server_socket(sock: Any, ctx: Any, endpoint: str, *, insecure_loopback: bool = False) -> Any | None:
    """Set up CURVE on the daemon's ROUTER before bind; returns the started authenticator (stop it before
    ``ctx.term()``), or None where no authentication applies (ipc, or --insecure-loopback).

    Must be called from the running asyncio loop that serves ``sock`` (the ZAP handler is a task on it).
    """
    if cs.tcp_host(endpoint) is None or insecure_loopback:
        return None
    import zmq
    from zmq.auth.asyncio import AsyncioAuthenticator

    try:
        public, secret = _server_keys()
        allow_list = AllowList(_authorized_dir())
    except cs.KeyFileError as exc:
        raise EndpointSecurityError(f"refusing to listen on {endpoint} without CURVE: {exc}") from None
    if not allow_list.keys():
        log.warning("no authorized client keys in %s: every client will be refused", allow_list.directory)
    authenticator = AsyncioAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
    authenticator.start()
    authenticator.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=allow_list)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    if hasattr(zmq, "ZAP_ENFORCE_DOMAIN"):  # fail closed should the ZAP handler ever be missing
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    log.info("CURVE on %s: %d authorized client key(s) in %s", endpoint, len(allow_list.keys()), allow_list.directory)
    return authenticator


class AllowList:
    """pyzmq ``credentials_provider``: is this client's public key in ``authorized/``? Re-read at each handshake."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def keys(self) -> dict[bytes, str]:
        """Z85 public key -> file name, for every readable ``*.key`` in the folder (bad files are logged, skipped)."""
        found: dict[bytes, str] = {}
        try:
            entries = sorted(self.directory.glob("*" + cs.PUBLIC_SUFFIX))
        except OSError as exc:
            log.error("cannot list %s: %s", self.directory, exc)
            return found
        for path in entries:
            try:
                found[cs.read_public_key(path)] = path.name
            except cs.KeyFileError as exc:
                log.warning("ignoring %s", exc)
        return found

    def callback(self, domain: str, key: bytes) -> bool:
        name = self.keys().get(key)
        if name is None:
            log.warning("refused a CURVE client with an unknown key %s", key.decode(errors="replace"))
            return False
        log.debug("CURVE client %s accepted", name)
        return True


def _server_keys() -> tuple[bytes, bytes]:
    directory = cs.keys_dir()
    _check_private_dir(directory)
    return cs.read_keypair(cs.SERVER, directory)


def _authorized_dir() -> Path:
    directory = cs.keys_dir() / cs.AUTHORIZED
    if not directory.is_dir():
        raise cs.KeyFileError(f"no allow-list folder {directory}")
    _check_private_dir(directory)
    return directory


def _check_private_dir(directory: Path) -> None:
    """Others must not be able to add a key to the allow-list, or swap the daemon's key."""
    try:
        st = directory.stat()
    except FileNotFoundError:
        raise cs.KeyFileError(f"no keys folder {directory}") from None
    if st.st_uid != os.getuid():
        raise cs.KeyFileError(f"{directory} belongs to uid {st.st_uid}, not to you (uid {os.getuid()})")
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise cs.KeyFileError(
            f"{directory} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); chmod 700 it"
        )
