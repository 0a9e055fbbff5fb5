"""Fixtures for the tray's desktop tests: a headless desktop, the tray as a real process, daemons (fake or real),
and the helpers that press keys, click the menu, play speech into the virtual microphone and take screenshots.

Skipped, with the reason, only where the desktop's programs (Xvfb, trayer, PulseAudio...) are missing; in CI they
are installed (see docs/tray.md) and these tests run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from desktop_env import Desktop, die_with_parent  # noqa: E402

REPO = HERE.parents[1]
BIN = Path(sys.executable).parent
SOTTOVOCE = str(BIN / "sottovoce")
STORE = Path(os.environ.get("SOTTOVOCE_MODELS_DIR") or REPO / ".work" / "models")
"""The model store `scripts/install.sh` fills, as for the other real-model tests."""
REAL_WHISPER = "whisper-tiny.en"
REAL_LLM = "smollm2-135m-instruct"
ARTIFACTS_ENV = "SOTTOVOCE_TEST_ARTIFACTS"
"""Set to a folder to keep the screenshots (CI uploads them); unset: pytest's tmp dir."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = Desktop.missing()
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.desktop)
            if missing:
                item.add_marker(
                    pytest.mark.skip(
                        reason=f"headless desktop unavailable: missing {', '.join(missing)} "
                        "(apt-get install xvfb xdotool trayer x11-utils dbus pulseaudio pulseaudio-utils "
                        "espeak-ng xclip)"
                    )
                )


@pytest.fixture(scope="session")
def desktop() -> Iterator[Desktop]:
    with Desktop() as d:
        yield d


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ[ARTIFACTS_ENV]) if os.environ.get(ARTIFACTS_ENV) else tmp_path / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """espeak-ng speech as a WAV file (cached per text)."""
    folder = tmp_path_factory.mktemp("speech")
    made: dict[str, Path] = {}

    def make(text: str) -> Path:
        if text not in made:
            path = folder / f"s{len(made)}.wav"
            subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), text], check=True, capture_output=True)
            made[text] = path
        return made[text]

    return make


class Session:
    """One test's private world on the shared desktop: runtime dir (sockets), config, history, log."""

    def __init__(self, desktop: Desktop, root: Path) -> None:
        self.desktop = desktop
        self.root = root
        self.runtime = root / "rt"
        self.runtime.mkdir(mode=0o700, parents=True)
        self.endpoint = f"ipc://{self.runtime}/daemon.sock"
        self.history = root / "history.jsonl"
        self.log = root / "tray.log"
        self.env = dict(desktop.env)
        self.env.update(
            SOTTOVOCE_RUNTIME_DIR=str(self.runtime),
            SOTTOVOCE_CONFIG=str(root / "config.toml"),
            SOTTOVOCE_HISTORY=str(self.history),
            SOTTOVOCE_LOG_TEXT="1",
            PYSTRAY_BACKEND="gtk",
            SOTTOVOCE_MODELS_DIR=str(STORE),
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )

    def entries(self) -> list[dict[str, Any]]:
        if not self.history.exists():
            return []
        return [json.loads(line) for line in self.history.read_text().splitlines() if line.strip()]


@pytest.fixture
def session(desktop: Desktop, tmp_path: Path) -> Session:
    return Session(desktop, tmp_path)


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait(5)
            raise AssertionError(f"{self.args[:3]} did not stop within {timeout} s:\n{self.tail()}") from None
        finally:
            self._log_file.close()
        return rc

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


class Daemon(Proc):
    def __init__(self, session: Session, *, real: bool = False, transcribe_delay: float = 0.0) -> None:
        if real:
            args = [
                SOTTOVOCE, "daemon", "--endpoint", session.endpoint,
                "--whisper-model", REAL_WHISPER, "--llm-model", REAL_LLM,
            ]  # fmt: skip
        else:
            args = [
                sys.executable, str(HERE / "fake_daemon.py"), session.endpoint,
                "--transcribe-delay", str(transcribe_delay),
            ]  # fmt: skip
        super().__init__(args, session.env, session.root / ("daemon.log" if real else "fake-daemon.log"))
        self.session = session

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the daemon answers `status` with both models loaded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.alive(), f"the daemon exited:\n{self.tail()}"
            r = subprocess.run(
                [SOTTOVOCE, "status", "--endpoint", self.session.endpoint, "--timeout", "2"],
                env=self.session.env, capture_output=True, text=True,
            )  # fmt: skip
            if r.returncode == 0:
                return
            time.sleep(0.3)
        raise AssertionError(f"the daemon was not ready within {timeout} s:\n{self.tail()}")


class Tray(Proc):
    def __init__(self, session: Session, *extra: str) -> None:
        args = [SOTTOVOCE, "tray", "--endpoint", session.endpoint, "--log-file", str(session.log), "-v", *extra]
        super().__init__(args, session.env, session.root / "tray.out")
        self.session = session
        self.desktop = session.desktop

    # ---- state, through the control socket ----
    def state(self) -> dict[str, Any]:
        from sottovoce.tray import control

        return control.send_command("status", runtime_dir=self.session.runtime, timeout=5)

    def command(self, cmd: str) -> dict[str, Any]:
        from sottovoce.tray import control

        return control.send_command(cmd, runtime_dir=self.session.runtime, timeout=5)

    def wait(self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 30.0) -> dict[str, Any]:
        from sottovoce.tray import control

        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.alive(), f"the tray exited:\n{self.tail()}\n{self.session.log.read_text()[-3000:]}"
            with contextlib.suppress(control.TrayNotRunning):
                state = self.state()
                if predicate(state):
                    return state
            time.sleep(0.05)
        raise AssertionError(f"tray: no {what} within {timeout} s; last state {state}\n{self.log_tail()}")

    def wait_look(self, look: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait(lambda st: st.get("look") == look, f"look {look!r}", timeout)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Connected, idle, and the microphone delivering audio: a key press now is heard from its start."""
        return self.wait(lambda st: st.get("look") == "idle" and bool(st.get("mic_ready")), "ready", timeout)

    def wait_turn_done(self, turn: int, timeout: float = 120.0) -> dict[str, Any]:
        return self.wait(
            lambda st: st.get("turn") == turn and st.get("phase") not in ("recording", "thinking"),
            f"end of turn {turn}",
            timeout,
        )

    def log_tail(self, n: int = 3000) -> str:
        log = self.session.log
        return log.read_text(errors="replace")[-n:] if log.exists() else self.tail(n)

    # ---- the icon on screen ----
    def icon_rect(self, timeout: float = 10.0) -> tuple[int, int, int, int]:
        """(x, y, w, h) of our icon docked in trayer, once it has settled at its full size.

        trayer docks an icon in steps (16x30, then 32x30): a rect is taken only when it is about as wide as the
        panel is high and unchanged between two looks, so that every screenshot compares like with like."""
        deadline = time.monotonic() + timeout
        previous = None
        while time.monotonic() < deadline:
            panel = self.desktop.tray_window()
            found = None
            if panel is not None:
                for rect in self.desktop.windows("sottovoce"):
                    if _inside(rect, panel) and rect[2] >= 16 and 5 * rect[2] >= 4 * rect[3]:
                        found = rect
            if found is not None and found == previous:
                return found
            previous = found
            time.sleep(0.1)
        tree = self.desktop.run("xwininfo", "-root", "-tree", check=False).stdout
        raise AssertionError(f"the tray icon did not dock in trayer:\n{tree}")

    def screenshot_icon(self) -> Any:
        from PIL import ImageGrab

        x, y, w, h = self.icon_rect()
        time.sleep(0.3)  # let GTK repaint after a state change
        screen = ImageGrab.grab(xdisplay=self.desktop.env["DISPLAY"])
        return screen.crop((x, y, x + w, y + h)).convert("RGB")

    def click_icon(self, button: int) -> None:
        x, y, w, h = self.icon_rect()
        self.desktop.run("xdotool", "mousemove", str(x + w // 2), str(y + h // 2), "click", str(button))

    def open_menu(self, timeout: float = 5.0) -> tuple[int, int, int, int]:
        self.click_icon(3)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rect in self.desktop.visible_windows("sottovoce"):
                if rect[2] > 100 and rect[3] > 100:
                    time.sleep(0.2)
                    return rect
            time.sleep(0.05)
        raise AssertionError("right-clicking the icon opened no menu")

    def click_menu_item(self, index: int, *, items: int, separators_before: int, separators: int = 2) -> None:
        """Click item ``index`` (counting items only) in the open menu of ``items`` items and ``separators``.

        GTK's default theme: 4 px padding, equal item heights, 1 px separators (measured from the menu height).
        """
        x, y, w, h = self.open_menu()
        pad, sep = 4, 1
        item_h = (h - 2 * pad - separators * sep) / items
        cy = y + pad + separators_before * sep + item_h * (index + 0.5)
        self.desktop.run("xdotool", "mousemove", str(x + w // 3), str(int(cy)))
        time.sleep(0.15)
        self.desktop.run("xdotool", "click", "1")


def _inside(rect: tuple[int, int, int, int], outer: tuple[int, int, int, int]) -> bool:
    x, y, w, h = rect
    ox, oy, ow, oh = outer
    return ox <= x and oy <= y and x + w <= ox + ow and y + h <= oy + oh


@pytest.fixture
def start_tray(session: Session) -> Iterator[Callable[..., Tray]]:
    trays: list[Tray] = []

    def start(*extra: str) -> Tray:
        tray = Tray(session, *extra)
        trays.append(tray)
        tray.wait(lambda st: True, "control socket", timeout=20)
        return tray

    yield start
    for tray in trays:
        if tray.alive():
            tray.stop()


@pytest.fixture
def start_daemon(session: Session) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def start(**kwargs: Any) -> Daemon:
        daemon = Daemon(session, **kwargs)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        if daemon.alive():
            daemon.stop()


def real_models_missing() -> str | None:
    """Why the real small models cannot be used here, or None."""
    try:
        from sottovoce.daemon.backends.base import ModelLoadError
        from sottovoce.daemon.models import store
    except ImportError as exc:
        return f"the daemon's packages are not installed ({exc})"
    for name, kind in ((REAL_WHISPER, "whisper"), (REAL_LLM, "llm")):
        folder = STORE / name
        try:
            entry = store.read_entry(folder) if folder.is_dir() else None
        except ModelLoadError:
            entry = None
        if entry is None or entry.kind != kind:
            return (
                f"model {name!r} is not in the store {STORE} (run `SOTTOVOCE_MODELS_DIR={STORE} sottovoce models "
                "fetch-defaults`, or scripts/install.sh)"
            )
    return None


def hold_and_speak(desktop: Desktop, keys: str, wav: Path, *, lead: float = 0.3, tail: float = 0.4) -> None:
    """Push-to-talk: hold ``keys`` (xdotool keydown), play ``wav`` into the virtual mic, release."""
    desktop.run("xdotool", "keydown", keys)
    try:
        time.sleep(lead)
        desktop.play(wav)
        time.sleep(tail)
    finally:
        desktop.run("xdotool", "keyup", keys)
