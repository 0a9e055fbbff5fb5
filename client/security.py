"""Who may talk to the daemon, client side: CURVE keys for TCP endpoints.

The default ipc endpoint needs nothing here: its socket file sits in an owner-only (0700) directory, so the kernel
refuses every other Unix user. TCP reaches every local user (and, off loopback, other machines), so a TCP daemon
speaks ZeroMQ CURVE (encryption plus an allow-list of client public keys) unless it was started with
``--insecure-loopback``.

Key files live in one private folder, ``keys_dir()``: ``platformdirs.user_config_dir("sottovoce")/keys``, or
``$SOTTOVOCE_KEYS_DIR``. They use pyzmq's certificate format (``zmq.auth.load_certificate`` reads them)::

    keys/server.key           the daemon's public key (copy it to a client machine's keys folder)
    keys/server.key_secret    the daemon's secret key (0600, never leaves this machine)
    keys/client.key           this user's client public key
    keys/client.key_secret    this user's client secret key (0600)
    keys/authorized/*.key     client public keys the daemon accepts (`sottovoce keys authorize FILE`)

This module is part of the lean client: it imports zmq and platformdirs only.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import stat
from pathlib import Path
from typing import Any

import platformdirs

from .errors import SottovoceError

log = logging.getLogger(__name__)

KEYS_DIR_ENV = "SOTTOVOCE_KEYS_DIR"
INSECURE_ENV = "SOTTOVOCE_INSECURE_LOOPBACK"
"""Client side of ``--insecure-loopback``: set to 1 to talk plain TCP to a loopback daemon started that way."""
SERVER = "server"
CLIENT = "client"
AUTHORIZED = "authorized"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
Z85_KEY_LEN = 40


class KeyFileError(SottovoceError):
    """A CURVE key is missing, malformed or not private enough; the message says which file and what to do."""

    exit_code = 2


# ---- endpoints -------------------------------------------------------------------------------------------------


def tcp_host(endpoint: str) -> str | None:
    """``tcp://HOST:PORT`` -> HOST (without IPv6 brackets); None for any other transport."""
    if not endpoint.startswith("tcp://"):
        return None
    rest = endpoint.removeprefix("tcp://")
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    return host.strip("[]")


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and the name ``localhost``; no DNS lookups (a name could resolve elsewhere later)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ---- key files -------------------------------------------------------------------------------------------------


def keys_dir() -> Path:
    if override := os.environ.get(KEYS_DIR_ENV):
        return Path(override).expanduser()
    return Path(platformdirs.user_config_dir("sottovoce")) / "keys"


def public_path(name: str, directory: Path | None = None) -> Path:
    return (directory or keys_dir()) / f"{name}{PUBLIC_SUFFIX}"


def secret_path(name: str, directory: Path | None = None) -> Path:
    return (directory or keys_dir()) / f"{name}{SECRET_SUFFIX}"


def check_z85_key(key: bytes, origin: str) -> bytes:
    """A 40-character Z85 CURVE key (32 bytes once decoded), else KeyFileError naming ``origin``."""
    import zmq.utils.z85 as z85

    if len(key) != Z85_KEY_LEN:
        raise KeyFileError(f"{origin}: a CURVE key is {Z85_KEY_LEN} Z85 characters, got {len(key)}")
    try:
        decoded = z85.decode(key)
    except Exception:  # z85.decode raises KeyError, struct.error, ValueError... on bad input
        raise KeyFileError(f"{origin}: not a Z85-encoded CURVE key") from None
    if len(decoded) != 32:
        raise KeyFileError(f"{origin}: not a 32-byte CURVE key")
    return key


def parse_key_text(text: bytes, origin: str) -> tuple[bytes, bytes | None]:
    """pyzmq certificate text (or one bare Z85 key line) -> (public key, secret key or None)."""
    public: bytes | None = None
    secret: bytes | None = None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(b"#")]
    for line in lines:
        if line.startswith(b"public-key") and b"=" in line:
            public = line.split(b"=", 1)[1].strip(b" \t'\"")
        elif line.startswith(b"secret-key") and b"=" in line:
            secret = line.split(b"=", 1)[1].strip(b" \t'\"")
    if public is None and len(lines) == 1 and len(lines[0]) == Z85_KEY_LEN:
        public = lines[0]  # a bare key, e.g. pasted from `sottovoce keys show`
    if public is None:
        raise KeyFileError(f"{origin}: no public-key in this file")
    check_z85_key(public, origin)
    if secret is not None:
        check_z85_key(secret, origin)
    return public, secret


def read_public_key(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_key_text(data, str(path))[0]


def check_private_file(path: Path) -> None:
    """A secret key must be ours and unreadable to others (like ssh's private keys)."""
    st = path.stat()
    if st.st_uid != os.getuid():
        raise KeyFileError(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()})")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KeyFileError(f"{path} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")


def read_keypair(name: str, directory: Path | None = None) -> tuple[bytes, bytes]:
    """(public, secret) from ``NAME.key_secret``; refuses a file others can read."""
    path = secret_path(name, directory)
    if not path.exists():
        raise KeyFileError(f"no CURVE key {path}; run `sottovoce keys generate`")
    check_private_file(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    public, secret = parse_key_text(data, str(path))
    if secret is None:
        raise KeyFileError(f"{path} holds no secret-key")
    return public, secret


def format_key_file(public: bytes, secret: bytes | None = None, *, comment: str = "") -> bytes:
    """The pyzmq certificate format, so ``zmq.auth.load_certificate`` and czmq tools read our files."""
    kind = "**Secret** Certificate: DO NOT GIVE THIS FILE TO ANYONE" if secret else "Public Certificate"
    lines = [
        f"#   ****  Generated on {datetime.datetime.now():%Y-%m-%d %H:%M:%S} by sottovoce  ****",
        f"#   ZeroMQ CURVE {kind}",
    ]
    if comment:
        lines.append(f"#   {comment}")
    lines += ["", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return ("\n".join(lines) + "\n").encode()


# ---- the socket ------------------------------------------------------------------------------------------------


def secure_client_socket(sock: Any, endpoint: str) -> None:
    """Configure ``sock`` (a DEALER, before connect) for the daemon's security.

    ipc: nothing (the kernel checks the socket file's owner-only permissions). tcp: CURVE with this user's client
    keypair and the daemon's public key from ``keys_dir()``; or plain TCP to a loopback daemon when
    ``$SOTTOVOCE_INSECURE_LOOPBACK=1`` (the daemon must have been started with ``--insecure-loopback``).
    Raises KeyFileError, naming the file and the command that fixes it, when a key is missing.
    """
    host = tcp_host(endpoint)
    if host is None:
        return
    if env_flag(INSECURE_ENV):
        if not is_loopback_host(host):
            raise KeyFileError(f"{INSECURE_ENV} is for loopback endpoints only, not {endpoint}")
        log.warning("connecting to %s without CURVE (%s is set)", endpoint, INSECURE_ENV)
        return
    directory = keys_dir()
    server_public = public_path(SERVER, directory)
    if not server_public.exists():
        raise KeyFileError(
            f"{endpoint} is a TCP endpoint, which needs CURVE keys: no daemon public key at {server_public} "
            "(on the daemon's machine run `sottovoce keys generate`; from another machine copy its server.key "
            f"there), or set {INSECURE_ENV}=1 for a loopback daemon started with --insecure-loopback"
        )
    public, secret = read_keypair(CLIENT, directory)
    sock.curve_serverkey = read_public_key(server_public)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
