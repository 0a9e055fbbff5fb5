"""The tray's local control channel: `sottovoce record --toggle` (and --start/--stop/--status/--quit) drive the
running tray, for desktops where global hotkeys cannot work (Wayland) and for scripts.

A ZeroMQ REP socket at ``ipc://<runtime dir>/tray.sock``, beside the daemon's socket in the same 0700 per-user
directory and created under umask 077, so only its owner can connect. One request, one reply, both one JSON
frame (at most 64 KiB):

    request  {"v": 1, "cmd": "toggle" | "start" | "stop" | "status" | "quit"}
    reply    {"ok": true, "state": {"phase": "recording", "turn": 3, ...}}
             {"ok": false, "error": "unknown command 'x'"}

Every command answers with the state after it took effect. A flock on ``tray.lock`` keeps a second tray from
binding the same path (a second bind would silently steal the socket from the first).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from sottovoce.client import paths

log = logging.getLogger(__name__)

CONTROL_VERSION = 1
COMMANDS = ("toggle", "start", "stop", "status", "quit")
MAX_REQUEST_BYTES = 64 * 1024
SOCKET_NAME = "tray.sock"
LOCK_NAME = "tray.lock"

Handler = Callable[[str], dict[str, Any]]
"""Runs a command in the tray and returns the state after it (a JSON-able dict)."""


class TrayNotRunning(RuntimeError):
    exit_code = 3


class TrayAlreadyRunning(RuntimeError):
    pass


def control_endpoint(runtime_dir: Path | None = None) -> str:
    return f"ipc://{(runtime_dir or paths.runtime_dir()) / SOCKET_NAME}"


class TrayLock:
    """An exclusive flock held for the tray's life (the kernel drops it if the tray dies)."""

    def __init__(self, runtime_dir: Path | None = None) -> None:
        self.path = (runtime_dir or paths.runtime_dir()) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        paths.ensure_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise TrayAlreadyRunning(f"a sottovoce tray (pid {holder}) is already running") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ControlServer:
    """Serves the control socket on its own thread; ``handler`` runs each command (it must be thread-safe)."""

    def __init__(self, handler: Handler, runtime_dir: Path | None = None) -> None:
        self.handler = handler
        self.runtime_dir = runtime_dir or paths.runtime_dir()
        self.endpoint = control_endpoint(self.runtime_dir)
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        paths.ensure_private_dir(self.runtime_dir)
        path = paths.ipc_path(self.endpoint)
        assert path is not None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead tray's socket; the TrayLock proves no live tray owns it
        sock = self._ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        old_umask = os.umask(0o077)
        try:
            sock.bind(self.endpoint)
        finally:
            os.umask(old_umask)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="tray-control", daemon=True)
        self._thread.start()
        log.info("control socket: %s", self.endpoint)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)
        path = paths.ipc_path(self.endpoint)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            while not self._stop.is_set():
                if not sock.poll(200):
                    continue
                frames = sock.recv_multipart()
                reply = self._answer(frames)
                sock.send(json.dumps(reply, ensure_ascii=False).encode())
        except Exception:
            log.exception("control channel failed")
        finally:
            sock.close(linger=0)

    def _answer(self, frames: list[bytes]) -> dict[str, Any]:
        try:
            if len(frames) != 1:
                raise ValueError(f"expected one JSON frame, got {len(frames)}")
            request = json.loads(frames[0])
            if not isinstance(request, dict):
                raise ValueError("the request must be a JSON object")
            version = request.get("v", CONTROL_VERSION)
            if version != CONTROL_VERSION:
                raise ValueError(f"control protocol {version!r} is not supported (this tray speaks 1)")
            cmd = request.get("cmd")
            if cmd not in COMMANDS:
                raise ValueError(f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})")
        except ValueError as exc:  # includes JSONDecodeError and UnicodeDecodeError
            return {"ok": False, "error": str(exc)}
        try:
            return {"ok": True, "state": self.handler(cmd)}
        except Exception as exc:
            log.exception("control command %s failed", cmd)
            return {"ok": False, "error": f"{cmd} failed: {exc}"}


def send_command(cmd: str, *, runtime_dir: Path | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to the running tray; returns its state. Raises TrayNotRunning or RuntimeError."""
    endpoint = control_endpoint(runtime_dir)
    path = paths.ipc_path(endpoint)
    if path is not None and not path.exists():
        raise TrayNotRunning(f"no sottovoce tray is running (no {path}); start one with `sottovoce tray`")
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(json.dumps({"v": CONTROL_VERSION, "cmd": cmd}).encode())
        if not sock.poll(int(timeout * 1000)):
            raise TrayNotRunning(f"the sottovoce tray at {endpoint} did not answer within {timeout:g} s")
        reply = json.loads(sock.recv())
    finally:
        sock.close(linger=0)
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise RuntimeError(str(reply.get("error") if isinstance(reply, dict) else reply))
    state = reply.get("state")
    return state if isinstance(state, dict) else {}


def wait_for_turn(
    turn: int, *, runtime_dir: Path | None = None, timeout: float = 300.0, poll: float = 0.1
) -> dict[str, Any]:
    """Poll the tray until turn ``turn`` is finished (answered, failed or superseded); returns the last state."""
    deadline = time.monotonic() + timeout
    while True:
        state = send_command("status", runtime_dir=runtime_dir)
        if state.get("turn") != turn or state.get("phase") not in ("recording", "thinking"):
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"turn {turn} was not answered within {timeout:g} s")
        time.sleep(poll)
