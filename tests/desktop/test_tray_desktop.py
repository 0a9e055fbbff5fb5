"""The tray for real, on a headless desktop: docked in a tray host, driven by global hotkeys (xdotool keydown/up),
menu clicks and `sottovoce record`, hearing espeak-ng speech through a PulseAudio virtual microphone.

The look-per-state, resilience and control tests use a daemon with fake models (a separate process, restarted
in a blink); the end-to-end test uses the real small models from the store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    REPO,
    SOTTOVOCE,
    Daemon,
    Session,
    Tray,
    hold_and_speak,
    real_models_missing,
)
from desktop_env import Desktop

from sottovoce.tray import icons
from sottovoce.tray.state import Look

pytestmark = pytest.mark.desktop

PTT = "ctrl+alt+space"
QUESTION = "What is the capital of France?"
DOCS_IMAGES = REPO / "docs" / "images"
UPDATE_DOCS_ENV = "SOTTOVOCE_UPDATE_DOCS_IMAGES"


def _mean_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def _dominant(image: Any) -> tuple[int, int, int]:
    """The icon's own colour: the mean of the pixels farthest from the tray's background (the corner pixel)."""
    px = np.asarray(image, np.float32).reshape(-1, 3)
    distance = np.abs(px - px[0]).sum(axis=1)
    r, g, b = px[distance >= np.percentile(distance, 75)].mean(axis=0)
    return int(r), int(g), int(b)


def test_each_state_has_its_own_look_on_screen(
    session: Session, start_tray: Callable[..., Tray], start_daemon: Callable[..., Daemon],
    speech: Callable[[str], Path], artifacts: Path,
) -> None:  # fmt: skip
    tray = start_tray()  # before the daemon: unreachable
    shots = {"unreachable": (tray.wait_look("unreachable"), tray.screenshot_icon())}

    daemon = start_daemon(transcribe_delay=2.5)  # a slow Whisper, to see "thinking"
    shots["idle"] = (tray.wait_ready(timeout=20), tray.screenshot_icon())

    wav = speech("Testing the tray, one two three.")
    session.desktop.run("xdotool", "keydown", PTT)
    try:
        shots["recording"] = (tray.wait_look("recording", timeout=5), tray.screenshot_icon())
        session.desktop.play(wav)
        time.sleep(0.3)
    finally:
        session.desktop.run("xdotool", "keyup", PTT)
    shots["thinking"] = (tray.wait_look("thinking", timeout=5), tray.screenshot_icon())
    done = tray.wait_turn_done(1, timeout=30)
    assert done["phase"] == "idle" and done["last_answer"].startswith("you said: heard"), done

    # Holding the key with nothing playing: the virtual mic gives exact zeros, like a mic without permission.
    session.desktop.run("xdotool", "keydown", PTT)
    time.sleep(1.5)
    session.desktop.run("xdotool", "keyup", PTT)
    state = tray.wait_look("error", timeout=10)
    assert "only silence" in state["error"] and "Privacy" in state["error"]
    shots["error"] = (state, tray.screenshot_icon())
    daemon.stop()

    for name, (_, image) in shots.items():
        image.save(artifacts / f"tray-{name}.png")
    names = list(shots)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = _mean_diff(shots[a][1], shots[b][1])
            assert diff > 8, f"the {a} and {b} icons look alike on screen (mean pixel difference {diff:.1f})"
    for name, (_, image) in shots.items():
        expected = np.array(icons.COLOURS[Look(name)], np.float32)
        got = np.array(_dominant(image), np.float32)
        assert np.abs(got - expected).max() < 60, f"{name}: dominant colour {got} is not near {expected}"

    montage = _montage([shots[n][1] for n in names], names)
    montage.save(artifacts / "tray-states.png")
    if os.environ.get(UPDATE_DOCS_ENV):
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        montage.save(DOCS_IMAGES / "tray-states.png")

    assert tray.stop() == 0
    entries = session.entries()
    assert [e["error"]["code"] if e["error"] else None for e in entries] == [None, "silent-mic"]
    assert entries[0]["source"] == "ptt" and entries[0]["audio_seconds"] > 1.5


def _montage(images: list[Any], labels: list[str]) -> Any:
    from PIL import Image, ImageDraw

    scale, pad = 4, 12
    w, h = images[0].size
    cell = (w * scale + pad, h * scale + pad + 16)
    out = Image.new("RGB", (cell[0] * len(images) + pad, cell[1] + pad), (250, 250, 250))
    draw = ImageDraw.Draw(out)
    for n, (image, label) in enumerate(zip(images, labels, strict=True)):
        x = pad + n * cell[0]
        out.paste(image.resize((w * scale, h * scale), Image.Resampling.NEAREST), (x, pad))
        draw.text((x, pad + h * scale + 4), label, fill=(30, 30, 30))
    return out


def test_record_command_drives_the_tray_and_quit_exits_0(
    session: Session, start_tray: Callable[..., Tray], start_daemon: Callable[..., Daemon],
    speech: Callable[[str], Path],
) -> None:  # fmt: skip
    """The Wayland fallback: a desktop shortcut bound to `sottovoce record --toggle`."""
    start_daemon()
    tray = start_tray("--no-hotkeys")
    tray.wait_ready(timeout=20)
    env = session.env
    out = subprocess.run([SOTTOVOCE, "record", "--toggle"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "recording"
    session.desktop.play(speech(QUESTION))
    time.sleep(0.3)
    out = subprocess.run(
        [SOTTOVOCE, "record", "--toggle", "--wait"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("» heard ") and lines[1].startswith("you said: heard"), out.stdout
    assert session.entries()[-1]["source"] == "control"

    out = subprocess.run([SOTTOVOCE, "record", "--quit"], env=env, capture_output=True, text=True)
    assert out.returncode == 0
    assert tray.proc.wait(15) == 0, tray.log_tail()
    out = subprocess.run([SOTTOVOCE, "record", "--status"], env=env, capture_output=True, text=True)
    assert out.returncode == 3 and "no sottovoce tray is running" in out.stderr


def test_daemon_restart_mid_recording_errors_then_recovers(
    session: Session, start_tray: Callable[..., Tray], start_daemon: Callable[..., Daemon],
    speech: Callable[[str], Path],
) -> None:  # fmt: skip
    daemon = start_daemon()
    tray = start_tray()
    tray.wait_ready(timeout=20)
    wav = speech(QUESTION)
    session.desktop.run("xdotool", "keydown", PTT)
    try:
        tray.wait_look("recording", timeout=5)
        session.desktop.play(wav)
        daemon.stop(signal.SIGKILL)  # dies mid-recording; a new one takes its place at once
        daemon = start_daemon()
        session.desktop.play(wav)
    finally:
        session.desktop.run("xdotool", "keyup", PTT)
    state = tray.wait_turn_done(1, timeout=15)
    assert state["phase"] == "error", state
    assert "restarted" in state["error"] or "lost the daemon" in state["error"], state
    assert session.entries()[-1]["error"]["code"] in ("daemon-restarted", "daemon-lost")

    tray.wait(lambda st: st["connected"], "reconnection", timeout=15)
    hold_and_speak(session.desktop, PTT, wav)
    state = tray.wait_turn_done(2, timeout=30)
    assert state["phase"] == "idle" and state["last_answer"].startswith("you said"), state
    assert tray.stop() == 0


def test_microphone_disappears_and_comes_back(tmp_path: Path, speech: Callable[[str], Path]) -> None:
    with Desktop(notifications=False, pulse=False) as own:  # its own sound server, to kill
        session = Session(own, tmp_path)
        daemon = Daemon(session)
        tray = Tray(session)
        try:
            state = tray.wait(lambda st: bool(st.get("mic_error")), "no-microphone message", timeout=20)
            assert "microphone" in state["mic_error"]
            assert state["look"] == "error"
            own.start_pulse()
            tray.wait_ready(timeout=20)
            wav = speech(QUESTION)
            own.run("xdotool", "keydown", PTT)
            try:
                tray.wait_look("recording", timeout=5)
                own.play(wav)
                own.kill_pulse()  # every device vanishes mid-recording
                state = tray.wait(lambda st: st["phase"] == "error", "error state", timeout=15)
            finally:
                own.run("xdotool", "keyup", PTT)
            assert "microphone" in state["error"] and "stopped delivering" in state["error"], state
            assert session.entries()[-1]["error"]["code"] == "mic"
            assert tray.alive()
            own.start_pulse()
            tray.wait(lambda st: st["mic_ready"] and not st["mic_error"], "microphone back", timeout=30)
            hold_and_speak(own, PTT, wav)
            state = tray.wait_turn_done(2, timeout=30)
            assert state["phase"] == "idle" and state["last_answer"], state
            assert tray.stop() == 0
        finally:
            for proc in (tray, daemon):
                if proc.alive():
                    proc.stop()


# ---- with the real small models ----


@pytest.mark.realmodels
@pytest.mark.slow
def test_real_models_by_hotkey_and_by_menu(
    session: Session, start_tray: Callable[..., Tray], start_daemon: Callable[..., Daemon],
    speech: Callable[[str], Path], artifacts: Path,
) -> None:  # fmt: skip
    missing = real_models_missing()
    if missing:
        pytest.skip(missing)
    daemon = start_daemon(real=True)
    tray = start_tray()
    wav = speech(QUESTION)
    daemon.wait_ready(timeout=150)
    tray.wait_ready(timeout=20)

    # 1) push-to-talk with the global hotkey, held by xdotool (X auto-repeats it meanwhile)
    hold_and_speak(session.desktop, PTT, wav)
    state = tray.wait_turn_done(1, timeout=120)
    assert state["phase"] == "idle", (state, tray.log_tail())
    heard = state["transcript"].lower()
    assert "capital" in heard and "france" in heard, state
    assert state["last_answer"].strip(), state
    entry = session.entries()[-1]
    assert entry["source"] == "ptt" and entry["transcript"] == state["transcript"]
    assert entry["answer"] == state["last_answer"] and entry["models"].startswith(
        "whisper-tiny.en + smollm2-135m-instruct"
    )
    assert state["transcript"] in tray.log_tail(20_000)  # the turn is logged (log_text on)

    # 2) the same through the menu: right-click the icon, click "Start recording", speak, "Stop recording and ask"
    # menu: status, Start/Stop, Heard (hidden while recording), Last answer, New conversation | Microphone,
    #       Open history, Open log | Quit
    tray.click_menu_item(1, items=9, separators_before=0)
    tray.wait_look("recording", timeout=5)
    session.desktop.play(wav)
    time.sleep(0.4)
    tray.click_menu_item(1, items=8, separators_before=0)
    state = tray.wait_turn_done(2, timeout=120)
    assert state["phase"] == "idle", (state, tray.log_tail())
    assert state["source"] == "menu"
    heard = state["transcript"].lower()
    assert "capital" in heard and "france" in heard, state
    assert state["last_answer"].strip()
    assert session.entries()[-1]["source"] == "menu"

    # 3) the last answer's item copies it
    tray.click_menu_item(3, items=9, separators_before=0)
    deadline = time.monotonic() + 5
    clip = ""
    while time.monotonic() < deadline and clip != state["last_answer"]:
        time.sleep(0.1)
        clip = session.desktop.run("xclip", "-o", "-selection", "clipboard", check=False).stdout
    assert clip == state["last_answer"]

    # the menu, for the docs
    from PIL import ImageGrab

    x, y, w, h = tray.open_menu()
    ix, iy, iw, ih = tray.icon_rect()
    screen = ImageGrab.grab(xdisplay=session.desktop.env["DISPLAY"])
    shot = screen.crop((min(x, ix) - 8, y - 8, max(x + w, ix + iw) + 8, max(y + h, iy + ih) + 8))
    shot.save(artifacts / "tray-menu.png")
    if os.environ.get(UPDATE_DOCS_ENV):
        shot.save(DOCS_IMAGES / "tray-menu.png")
    session.desktop.run("xdotool", "key", "Escape")
    time.sleep(0.3)

    # 4) Quit from the menu: exit status 0
    tray.click_menu_item(8, items=9, separators_before=2)
    assert tray.proc.wait(15) == 0, tray.log_tail()
