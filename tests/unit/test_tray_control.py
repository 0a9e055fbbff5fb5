"""The tray's control channel (`sottovoce record`): commands, bad requests, privacy, one tray per user."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from sottovoce.tray import cli as tray_cli
from sottovoce.tray import control


class FakeTray:
    def __init__(self) -> None:
        self.phase = "idle"
        self.turn = 0
        self.commands: list[str] = []

    def handle(self, cmd: str) -> dict[str, Any]:
        self.commands.append(cmd)
        if cmd in ("toggle", "start") and self.phase != "recording":
            self.phase, self.turn = "recording", self.turn + 1
        elif cmd in ("toggle", "stop") and self.phase == "recording":
            self.phase = "thinking"
            threading.Timer(0.3, self._answer).start()
        elif cmd == "status" and self.phase == "boom":
            raise RuntimeError("broken")
        return {"phase": self.phase, "turn": self.turn, "connected": True, "transcript": "hi", "last_answer": "Hello."}

    def _answer(self) -> None:
        self.phase = "idle"


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "rt"
    monkeypatch.setenv("SOTTOVOCE_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def served(runtime: Path) -> Iterator[FakeTray]:
    tray = FakeTray()
    server = control.ControlServer(tray.handle)
    server.start()
    try:
        yield tray
    finally:
        server.stop()


def test_commands_round_trip(served: FakeTray, runtime: Path) -> None:
    assert control.send_command("status")["phase"] == "idle"
    assert control.send_command("toggle")["phase"] == "recording"
    state = control.send_command("stop")
    assert state["phase"] == "thinking" and state["turn"] == 1
    assert control.wait_for_turn(1, timeout=5)["phase"] == "idle"
    assert served.commands[:3] == ["status", "toggle", "stop"]


def test_socket_is_owner_only(served: FakeTray, runtime: Path) -> None:
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    sock = runtime / control.SOCKET_NAME
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ([b"not json"], "Expecting value"),
        ([b"[1, 2]"], "JSON object"),
        ([json.dumps({"cmd": "dance"}).encode()], "unknown command 'dance'"),
        ([json.dumps({"v": 9, "cmd": "status"}).encode()], "not supported"),
        ([b"{}", b"{}"], "one JSON frame"),
        ([b"\xff\xfe"], ""),
    ],
)
def test_bad_requests_get_an_error_and_the_server_goes_on(
    served: FakeTray, runtime: Path, frames: list[bytes], error: str
) -> None:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(control.control_endpoint())
    sock.send_multipart(frames)
    assert sock.poll(3000)
    reply = json.loads(sock.recv())
    sock.close()
    assert reply["ok"] is False and error in reply["error"]
    assert control.send_command("status")["phase"] == "idle"


def test_handler_failure_is_reported(served: FakeTray, runtime: Path) -> None:
    served.phase = "boom"
    with pytest.raises(RuntimeError, match="status failed: broken"):
        control.send_command("status")


def test_not_running(runtime: Path) -> None:
    with pytest.raises(control.TrayNotRunning, match="no sottovoce tray is running"):
        control.send_command("toggle")


def test_one_tray_per_runtime_dir(runtime: Path) -> None:
    first = control.TrayLock()
    first.acquire()
    try:
        with pytest.raises(control.TrayAlreadyRunning, match=f"pid {os.getpid()}"):
            control.TrayLock().acquire()
    finally:
        first.release()
    again = control.TrayLock()
    again.acquire()
    again.release()


def test_record_cli(served: FakeTray, runtime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sottovoce.client.cli import main

    assert main(["record", "--status"]) == 0
    assert capsys.readouterr().out.strip() == "idle"
    assert main(["record", "--toggle", "--wait"]) == 0  # it started a recording: nothing to wait for
    assert capsys.readouterr().out.strip() == "recording"
    assert main(["record", "--status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["phase"] == "recording"
    assert main(["record", "--toggle", "--wait"]) == 0
    assert capsys.readouterr().out.splitlines() == ["» hi", "Hello."]


def test_record_cli_without_tray(runtime: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sottovoce.client.cli import main

    assert main(["record", "--toggle"]) == tray_cli.EXIT_NOT_RUNNING
    assert "sottovoce tray" in capsys.readouterr().err
