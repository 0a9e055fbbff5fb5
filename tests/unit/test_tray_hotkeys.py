"""Hotkey specs and the combination tracker (pynput itself is exercised by the desktop tests)."""

from __future__ import annotations

import pytest

from sottovoce.tray import hotkeys
from sottovoce.tray.hotkeys import ComboTracker, HotkeyError


def test_parse_spec() -> None:
    assert hotkeys.parse_spec("<ctrl>+<alt>+<space>") == ["ctrl", "alt", "space"]
    assert hotkeys.parse_spec("<cmd>+<shift>+A") == ["cmd", "shift", "a"]
    assert hotkeys.parse_spec("<f9>") == ["f9"]
    assert hotkeys.parse_spec("<ctrl>++") == ["ctrl", "+"]


@pytest.mark.parametrize("bad", ["", "<ctrl>+", "ctrl+t", "<ctrl>+<ctrl>", "<>", "<ctrl>+ab"])
def test_parse_spec_rejects(bad: str) -> None:
    with pytest.raises(HotkeyError):
        hotkeys.parse_spec(bad)


def test_hint() -> None:
    assert hotkeys.hint("<ctrl>+<alt>+<space>") == "Ctrl+Alt+Space"
    assert hotkeys.hint("<ctrl>+<alt>+t") == "Ctrl+Alt+T"
    assert hotkeys.hint(None) == ""


def test_combo_fires_once_per_hold_despite_auto_repeat() -> None:
    combo = ComboTracker(["ctrl", "alt", "space"])
    assert not combo.press("ctrl") and not combo.press("alt")
    assert combo.press("space")
    # X auto-repeat: many presses of the held key, one release
    assert not any(combo.press("space") for _ in range(30))
    assert combo.release("space")
    assert not combo.release("alt") and not combo.release("ctrl")


def test_combo_order_and_other_keys() -> None:
    combo = ComboTracker(["ctrl", "alt", "space"])
    assert not combo.press("space") and not combo.press("x") and not combo.press("alt")
    assert combo.press("ctrl")  # complete in any order
    assert not combo.release("x")
    assert combo.release("ctrl")  # breaking it with any of its keys ends it
    assert combo.press("ctrl")  # pressing it again completes it again
    combo.reset()
    assert not combo.active


def test_combo_requires_a_new_press_after_release() -> None:
    combo = ComboTracker(["ctrl", "t"])
    assert not combo.press("ctrl") and combo.press("t")
    assert combo.release("t")
    assert combo.press("t")  # ctrl still held: a second toggle
    with pytest.raises(ValueError):
        ComboTracker([])


@pytest.mark.parametrize(
    ("environ", "platform", "expected"),
    [
        ({"DISPLAY": ":0"}, "linux", None),
        ({"DISPLAY": ":0", "XDG_SESSION_TYPE": "x11"}, "linux", None),
        ({"WAYLAND_DISPLAY": "wayland-0", "XDG_SESSION_TYPE": "wayland", "DISPLAY": ":0"}, "linux", "Wayland"),
        ({"WAYLAND_DISPLAY": "wayland-0"}, "linux", "Wayland"),
        ({}, "linux", "DISPLAY"),
        ({}, "darwin", None),
    ],
)
def test_unavailable_reason(environ: dict[str, str], platform: str, expected: str | None) -> None:
    reason = hotkeys.unavailable_reason(environ, platform)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason and "sottovoce record --toggle" in reason


def test_listener_dispatch_without_pynput() -> None:
    """The listener's press/release plumbing, with the trackers set by hand (no display needed)."""
    calls: list[str] = []
    listener = hotkeys.HotkeyListener(
        "<ctrl>+<space>",
        "<ctrl>+t",
        on_ptt_down=lambda: calls.append("down"),
        on_ptt_up=lambda: calls.append("up"),
        on_toggle=lambda: calls.append("toggle"),
    )
    listener.ptt = ComboTracker(["ctrl", "space"])
    listener.toggle = ComboTracker(["ctrl", "t"])
    for key in ["ctrl", "space", "space", "space"]:
        listener._press(key)
    listener._release("space")
    listener._press("t")
    listener._release("t")
    listener._release("ctrl")
    assert calls == ["down", "up", "toggle"]
    with pytest.raises(HotkeyError):
        hotkeys.HotkeyListener("ctrl+x", None, on_ptt_down=list, on_ptt_up=list, on_toggle=list)
