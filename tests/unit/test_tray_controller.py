"""The controller: events from any thread, applied in order, effects carried out (engine commands, view, history)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from sottovoce.tray import app as tray_app
from sottovoce.tray import desktop, engine, icons
from sottovoce.tray import state as s
from sottovoce.tray.history import History


class FakeView:
    def __init__(self) -> None:
        self.rendered: list[s.TrayState] = []
        self.notes: list[tuple[str, str]] = []
        self.stopped = threading.Event()

    def render(self, state: s.TrayState) -> None:
        self.rendered.append(state)

    def notify(self, title: str, message: str) -> None:
        self.notes.append((title, message))

    def stop(self) -> None:
        self.stopped.set()


Parts = tuple[tray_app.Controller, FakeView, list[object], list[str | None], list[str]]


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    view = FakeView()
    commands: list[object] = []
    saved: list[str | None] = []
    copied: list[str] = []
    controller = tray_app.Controller(
        view,
        commands.append,
        history=History(tmp_path / "h" / "history.jsonl"),
        log_text=True,
        save_microphone=saved.append,
        copy=copied.append,
    )
    return controller, view, commands, saved, copied


def test_turn_goes_to_engine_view_and_history(parts: Parts, tmp_path: Path) -> None:
    controller, view, commands, _, _ = parts
    controller.handle(s.DaemonUp("fake + fake"))
    controller.handle(s.PttDown(), at=10.0)
    controller.handle(s.PttUp(), at=12.0)
    assert commands == [engine.Start(1, 10.0), engine.Stop(1, 12.0)]
    controller.handle(s.Heard(1, "hello"))
    controller.handle(s.AnswerDelta(1, "Hi"))
    controller.handle(s.Answered(1, "hello", "Hi there.", details={"up_to_done": 1.25, "audio_seconds": 2.0}))
    assert [st.look for st in view.rendered] == [
        s.Look.IDLE, s.Look.RECORDING, s.Look.THINKING, s.Look.THINKING, s.Look.THINKING, s.Look.IDLE
    ]  # fmt: skip
    assert view.notes == [("» hello", "Hi there.")]
    lines = (tmp_path / "h" / "history.jsonl").read_text().splitlines()
    entry = json.loads(lines[0])
    assert entry["transcript"] == "hello" and entry["answer"] == "Hi there." and entry["error"] is None
    assert entry["up_to_done"] == 1.25 and entry["source"] == "ptt" and entry["models"] == "fake + fake"
    assert oct((tmp_path / "h" / "history.jsonl").stat().st_mode & 0o777) == "0o600"


def test_failed_turn_is_recorded(parts: Parts, tmp_path: Path) -> None:
    controller, view, commands, _, _ = parts
    controller.handle(s.DaemonUp())
    controller.handle(s.Toggle("menu"))
    controller.handle(s.TurnFailed(1, "silent-mic", "only zeros"))
    assert engine.Cancel(1) in commands
    entry = History(tmp_path / "h" / "history.jsonl").read()[0]
    assert entry["error"] == {"code": "silent-mic", "text": "only zeros"} and entry["source"] == "menu"
    assert ("sottovoce: error", "only zeros") in view.notes


def test_microphone_choice_is_used_and_saved(parts: Parts) -> None:
    controller, _, commands, saved, _ = parts
    controller.handle(s.ChooseMicrophone("USB Mic"))
    assert commands == [engine.SetMicrophone("USB Mic")] and saved == ["USB Mic"]


def test_copy_runs_off_the_controller_thread(parts: Parts) -> None:
    controller, _, _, _, copied = parts
    controller.state = s.TrayState(connected=True, last_answer="Paris.")
    controller.handle(s.CopyAnswer())
    deadline = time.monotonic() + 2
    while not copied and time.monotonic() < deadline:
        time.sleep(0.01)
    assert copied == ["Paris."]


def test_copy_failure_is_told(parts: Parts) -> None:
    controller, view, _, _, _ = parts

    def broken(text: str) -> None:
        raise desktop.DesktopError("no clipboard tool found: install xclip")

    controller.copy = broken
    controller.state = s.TrayState(connected=True, last_answer="Paris.")
    controller.handle(s.CopyAnswer())
    deadline = time.monotonic() + 2
    while not view.notes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert view.notes == [("sottovoce", "no clipboard tool found: install xclip")]


def test_thread_control_channel_and_quit(parts: Parts) -> None:
    controller, view, commands, _, _ = parts
    controller.start()
    controller.post(s.DaemonUp("d"))
    state = controller.control("toggle")
    assert state["phase"] == "recording" and state["turn"] == 1 and state["connected"]
    assert controller.control("status")["phase"] == "recording"
    assert controller.control("stop")["phase"] == "thinking"
    controller.control("quit")
    assert view.stopped.wait(2) and controller.finished.wait(2)
    assert commands[-1] == engine.Cancel(1)


def test_icons_differ_per_look() -> None:
    pictures = {look: icons.icon(look).tobytes() for look in s.Look}
    assert len(set(pictures.values())) == len(s.Look)
    for look in s.Look:
        image = icons.icon(look)
        assert image.size == (icons.SIZE, icons.SIZE) and image.mode == "RGBA"
        r, g, b, _ = image.getpixel((icons.SIZE // 2, 6))  # the disc's (or ring's) colour near the top
        assert (r, g, b) != (255, 255, 255)
    assert icons.sheet(32).size[0] > 5 * 32


def test_clipboard_command_choice() -> None:
    assert desktop.clipboard_command({}, "darwin") in (["pbcopy"], None)
    assert desktop.clipboard_command({}, "linux") is None
