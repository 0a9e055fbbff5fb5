"""Where sottovoce keeps its socket, config and data (all from platformdirs), and the private runtime directory."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import platformdirs

APP = "sottovoce"
SOCKET_NAME = "daemon.sock"


class UnsafeDirectoryError(RuntimeError):
    """The runtime directory exists but others could reach or replace the socket in it."""


def runtime_dir() -> Path:
    """Per-user directory for the ipc socket and the daemon's lock.

    ``$XDG_RUNTIME_DIR/sottovoce`` on Linux (already private to the user), the platformdirs runtime dir on macOS,
    and ``<tmp>/sottovoce-<uid>`` where neither exists (e.g. a root shell without a login session).
    """
    if override := os.environ.get("SOTTOVOCE_RUNTIME_DIR"):
        return Path(override)
    if os.name == "posix" and not os.environ.get("XDG_RUNTIME_DIR") and not _is_macos():
        return Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}"
    return Path(platformdirs.user_runtime_dir(APP))


def _is_macos() -> bool:
    return os.uname().sysname == "Darwin"


def default_endpoint() -> str:
    return f"ipc://{runtime_dir() / SOCKET_NAME}"


def config_file() -> Path:
    if override := os.environ.get("SOTTOVOCE_CONFIG"):
        return Path(override)
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def ipc_path(endpoint: str) -> Path | None:
    """The filesystem path behind an ``ipc://`` endpoint, else None."""
    return Path(endpoint.removeprefix("ipc://")) if endpoint.startswith("ipc://") else None


def ensure_private_dir(path: Path, *, fix: str | None = None) -> Path:
    """Create ``path`` as 0700, or check that an existing one belongs to us and nobody else can enter it.

    A socket in a directory that others can write could be replaced under us; one others can enter could be
    connected to. Refusing is safer than silently fixing a directory someone else may have made. ``fix`` replaces
    the advice to chmod it (wrong for a folder the user chose to share, like /tmp).
    """
    old_umask = os.umask(0o077)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    finally:
        os.umask(old_umask)
    st = path.stat()
    if st.st_uid != os.getuid():
        advice = f"; {fix}" if fix else ""
        raise UnsafeDirectoryError(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}){advice}")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UnsafeDirectoryError(
            f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); {fix or f'run `chmod 700 {path}`'}"
        )
    return path
