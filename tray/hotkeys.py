"""Global hotkeys: push-to-talk (hold to record, release to ask) and toggle, with pynput.

Keys are written as pynput writes them: ``<ctrl>+<alt>+<space>``, ``<cmd>+<shift>+a``, ``<f9>``. The logic that
turns key presses into "the combination went down / came up" is ``ComboTracker``: pure, unit-tested, and deaf to
auto-repeat (a held key sends many presses and one release; only the first press counts).

pynput is imported only when the listener starts: on Linux it needs an X display at import time. Where global
hotkeys cannot work (a Wayland session: compositors do not let one program see another's keys), ``start``
says why and the tray carries on with its menu; bind a desktop shortcut to ``sottovoce record --toggle``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

WAYLAND_FALLBACK = (
    "global hotkeys are not available in a Wayland session; bind a desktop keyboard shortcut to "
    "`sottovoce record --toggle` (see docs/tray.md)"
)


class HotkeyError(ValueError):
    pass


def parse_spec(spec: str) -> list[str]:
    """``"<ctrl>+<alt>+t"`` -> ``["ctrl", "alt", "t"]``; raises HotkeyError for a malformed spec."""
    parts: list[str] = []
    start = 0
    for i, c in enumerate(spec):
        if c == "+" and i != start:
            parts.append(spec[start:i])
            start = i + 1
    if start >= len(spec):
        raise HotkeyError(f"bad hotkey {spec!r}: it ends with '+' or is empty")
    parts.append(spec[start:])
    names = []
    for part in parts:
        if len(part) == 1:
            names.append(part.lower())
        elif len(part) > 2 and part[0] == "<" and part[-1] == ">":
            names.append(part[1:-1].lower())
        else:
            raise HotkeyError(
                f"bad hotkey {spec!r}: {part!r} should be one character or a <name> such as <ctrl> or <space>"
            )
    if len(set(names)) != len(names):
        raise HotkeyError(f"bad hotkey {spec!r}: a key appears twice")
    return names


def hint(spec: str | None) -> str:
    """A human-readable form: ``<ctrl>+<alt>+<space>`` -> ``Ctrl+Alt+Space``."""
    if not spec:
        return ""
    try:
        return "+".join(n.upper() if len(n) == 1 else n.capitalize() for n in parse_spec(spec))
    except HotkeyError:
        return spec


def unavailable_reason(environ: Mapping[str, str] | None = None, platform: str | None = None) -> str | None:
    """Why global hotkeys cannot work here, or None where they can."""
    environ = os.environ if environ is None else environ
    platform = platform or sys.platform
    if not platform.startswith("linux"):
        return None
    if environ.get("XDG_SESSION_TYPE") == "wayland" or (environ.get("WAYLAND_DISPLAY") and not environ.get("DISPLAY")):
        return WAYLAND_FALLBACK
    if not environ.get("DISPLAY"):
        return "no X display (DISPLAY is unset), so no global hotkeys; use `sottovoce record --toggle`"
    return None


class ComboTracker:
    """Tracks one key combination: ``press`` returns True once when it is complete, ``release`` True once when
    it breaks. Repeated presses of held keys (auto-repeat) change nothing."""

    def __init__(self, keys: Iterable[Hashable]) -> None:
        self.keys = frozenset(keys)
        if not self.keys:
            raise ValueError("empty key combination")
        self._down: set[Hashable] = set()
        self.active = False

    def press(self, key: Hashable) -> bool:
        if key not in self.keys:
            return False
        self._down.add(key)
        if not self.active and self._down == self.keys:
            self.active = True
            return True
        return False

    def release(self, key: Hashable) -> bool:
        if key not in self.keys:
            return False
        self._down.discard(key)
        if self.active:
            self.active = False
            return True
        return False

    def reset(self) -> None:
        self._down.clear()
        self.active = False


class HotkeyListener:
    """pynput's keyboard listener feeding one push-to-talk and one toggle ``ComboTracker``."""

    def __init__(
        self,
        ptt: str | None,
        toggle: str | None,
        *,
        on_ptt_down: Callable[[], None],
        on_ptt_up: Callable[[], None],
        on_toggle: Callable[[], None],
    ) -> None:
        for spec in (ptt, toggle):
            if spec:
                parse_spec(spec)  # fail early, with our message
        self.ptt_spec, self.toggle_spec = ptt, toggle
        self._on_ptt_down, self._on_ptt_up, self._on_toggle = on_ptt_down, on_ptt_up, on_toggle
        self._listener: Any = None
        self.ptt: ComboTracker | None = None
        self.toggle: ComboTracker | None = None

    def start(self) -> str | None:
        """Start listening; returns None, or why global hotkeys are not available (the tray shows it)."""
        reason = unavailable_reason()
        if reason and reason is not WAYLAND_FALLBACK:
            return reason
        try:
            from pynput import keyboard
        except Exception as exc:  # ImportError, or Xlib's DisplayNameError when the display is unreachable
            return f"global hotkeys unavailable ({exc}); use `sottovoce record --toggle`"
        try:
            if self.ptt_spec:
                self.ptt = ComboTracker(keyboard.HotKey.parse(self.ptt_spec))
            if self.toggle_spec:
                self.toggle = ComboTracker(keyboard.HotKey.parse(self.toggle_spec))
        except ValueError as exc:
            raise HotkeyError(f"bad hotkey: {exc}") from None
        listener = keyboard.Listener(on_press=self._press, on_release=self._release)
        listener.daemon = True
        self._listener = listener
        listener.start()
        listener.wait()  # until its X connection is up, so a key pressed right after start is seen
        if sys.platform == "darwin" and not getattr(listener, "IS_TRUSTED", True):
            return (
                "global hotkeys need permission: allow this program in System Settings > Privacy & Security > "
                "Accessibility (and Input Monitoring), then restart the tray"
            )
        log.info("hotkeys: push-to-talk %s, toggle %s", self.ptt_spec, self.toggle_spec)
        return reason  # under Wayland (with XWayland) the listener sees only X programs' keys

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def _canonical(self, key: Any) -> Any:
        listener = self._listener
        return listener.canonical(key) if listener is not None and key is not None else key

    def _press(self, key: Any, injected: bool = False) -> None:
        try:
            k = self._canonical(key)
            if self.ptt is not None and self.ptt.press(k):
                self._on_ptt_down()
            if self.toggle is not None and self.toggle.press(k):
                self._on_toggle()
        except Exception:  # an exception would stop pynput's listener thread for good
            log.exception("hotkey handler failed")

    def _release(self, key: Any, injected: bool = False) -> None:
        try:
            k = self._canonical(key)
            if self.ptt is not None and self.ptt.release(k):
                self._on_ptt_up()
            if self.toggle is not None:
                self.toggle.release(k)
        except Exception:
            log.exception("hotkey handler failed")
