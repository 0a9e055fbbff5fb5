"""One daemon per endpoint: a second `bind` on an ipc path would silently steal the socket from the first."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path


class AlreadyRunningError(RuntimeError):
    pass


class EndpointLock:
    """An exclusive ``flock`` on a file beside the socket, held for the daemon's life; the kernel drops it on exit."""

    def __init__(self, path: Path, endpoint: str) -> None:
        self.path = path
        self.endpoint = endpoint
        self._fd: int | None = None

    @classmethod
    def for_endpoint(cls, endpoint: str, runtime_dir: Path) -> EndpointLock:
        if endpoint.startswith("ipc://"):
            return cls(Path(endpoint.removeprefix("ipc://") + ".lock"), endpoint)
        digest = hashlib.sha256(endpoint.encode()).hexdigest()[:16]
        return cls(runtime_dir / f"endpoint-{digest}.lock", endpoint)

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunningError(
                f"another sottovoce daemon (pid {holder}) is already serving {self.endpoint}; "
                "stop it first or choose another --endpoint"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
