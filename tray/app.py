"""`sottovoce tray`: the pystray icon, wired to the state machine, the IO thread, the hotkeys and the control socket.

Threads:
- main: pystray's ``Icon.run()`` (on Linux a GLib main loop); menu callbacks run here and only post events;
- controller: runs ``state.step`` for every event, in order, and carries out the effects (commands to the IO thread,
  icon/menu/tooltip, notifications, clipboard, history);
- tray-io (``engine.Engine``): the DEALER socket and the microphone;
- pynput's listener, PortAudio's callback and the control socket's thread: they only post events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sottovoce.client.config import Settings

from . import control, desktop, hotkeys, icons, prefs
from . import state as s
from .engine import Cancel, Engine, ForgetConversation, SetMicrophone, Start, Stop
from .history import History, log_path

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0


class View(Protocol):
    """What the controller needs from the GUI (the pystray icon, or a fake in tests)."""

    def render(self, state: s.TrayState) -> None: ...
    def notify(self, title: str, message: str) -> None: ...
    def stop(self) -> None: ...


class Controller:
    """Owns the ``TrayState``; every thread posts events here; one thread applies them in order."""

    def __init__(
        self,
        view: View,
        engine_command: Callable[[object], None],
        *,
        history: History,
        log_text: bool = False,
        microphone: str | None = None,
        save_microphone: Callable[[str | None], None] | None = None,
        copy: Callable[[str], None] = desktop.copy_to_clipboard,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.view = view
        self.engine_command = engine_command
        self.history = history
        self.log_text = log_text
        self.save_microphone = save_microphone
        self.copy = copy
        self.clock = clock
        self.state = s.TrayState(microphone=microphone, daemon="connecting…")
        self.models = ""
        self._queue: queue.Queue[tuple[s.Event, float, threading.Event | None]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tray-controller", daemon=True)
        self.finished = threading.Event()

    # ---- posting (any thread) ----
    def post(self, event: s.Event) -> None:
        self._queue.put((event, self.clock(), None))

    def call(self, event: s.Event, timeout: float = 5.0) -> s.TrayState:
        """Post ``event`` and wait until it has been applied; returns the state after it."""
        done = threading.Event()
        self._queue.put((event, self.clock(), done))
        done.wait(timeout)
        return self.state

    def start(self) -> None:
        self._thread.start()

    # ---- the loop ----
    def _run(self) -> None:
        try:
            while not self.finished.is_set():
                try:
                    event, at, done = self._queue.get(timeout=TICK_SECONDS)
                except queue.Empty:
                    event, at, done = s.Tick(), self.clock(), None
                try:
                    self.handle(event, at)
                except Exception:
                    log.exception("handling %r failed", event)
                finally:
                    if done is not None:
                        done.set()
        finally:
            self.finished.set()

    def handle(self, event: s.Event, at: float | None = None) -> list[s.Effect]:
        """Apply one event now (the controller thread, or a test)."""
        at = self.clock() if at is None else at
        old = self.state
        new, effects = s.step(old, event, self.clock())
        self.state = new
        if isinstance(event, s.DaemonUp):
            self.models = event.description
        if new.phase is not old.phase or new.look is not old.look:
            log.info("state: %s -> %s (%s)", old.look.value, new.look.value, type(event).__name__)
        if new != old:
            self.view.render(new)  # first, so a notification shows the new icon
        for effect in effects:
            self._do(effect, at)
        return effects

    def _do(self, effect: s.Effect, at: float) -> None:
        if isinstance(effect, s.StartCapture):
            self.engine_command(Start(effect.turn, at))
        elif isinstance(effect, s.StopCapture):
            self.engine_command(Stop(effect.turn, at))
        elif isinstance(effect, s.CancelTurn):
            self.engine_command(Cancel(effect.turn))
        elif isinstance(effect, s.Notify):
            self.view.notify(effect.title, effect.message)
        elif isinstance(effect, s.Copy):
            threading.Thread(target=self._copy, args=(effect.text,), name="tray-copy", daemon=True).start()
        elif isinstance(effect, s.ForgetConversation):
            self.engine_command(ForgetConversation())
        elif isinstance(effect, s.UseMicrophone):
            self.engine_command(SetMicrophone(effect.name))
            if self.save_microphone is not None:
                try:
                    self.save_microphone(effect.name)
                except prefs.PrefsError as exc:
                    log.error("%s", exc)
                    self.view.notify("sottovoce", f"Could not remember the microphone: {exc}")
        elif isinstance(effect, s.RecordTurn):
            self._record(effect)
        elif isinstance(effect, s.Exit):
            self.finished.set()
            self.view.stop()

    def _copy(self, text: str) -> None:
        try:
            self.copy(text)
        except desktop.DesktopError as exc:
            log.error("%s", exc)
            self.view.notify("sottovoce", str(exc))
            return
        log.info("copied the last answer (%d characters) to the clipboard", len(text))

    def _record(self, record: s.RecordTurn) -> None:
        line = self.history.append(record, {"models": self.models} if self.models else None)
        timing = " ".join(
            f"{k}={line[k]:.3f}s"
            for k in ("down_to_first_chunk", "up_to_transcript", "up_to_first_answer", "up_to_done")
            if isinstance(line.get(k), int | float)
        )
        if record.error_code:
            log.info("turn %d (%s) failed [%s]: %s", record.turn, record.source, record.error_code, record.error)
        elif self.log_text:
            log.info(
                "turn %d (%s): heard %r; answered %r; %s",
                record.turn,
                record.source,
                record.transcript,
                record.answer,
                timing,
            )
        else:
            log.info(
                "turn %d (%s): heard %d characters; answered %d characters; %s",
                record.turn,
                record.source,
                len(record.transcript or ""),
                len(record.answer or ""),
                timing,
            )

    # ---- the control channel ----
    def control(self, cmd: str) -> dict[str, Any]:
        if cmd == "toggle":
            state = self.call(s.Toggle("control"))
        elif cmd == "start":
            state = self.call(s.StartRequested("control"))
        elif cmd == "stop":
            state = self.call(s.StopRequested("control"))
        elif cmd == "quit":
            self.post(s.Quit())
            state = self.state
        else:
            state = self.state
        return snapshot(state)


def snapshot(state: s.TrayState) -> dict[str, Any]:
    """The state as the control channel reports it."""
    return {
        "phase": state.phase.value,
        "look": state.look.value,
        "connected": state.connected,
        "daemon": state.daemon,
        "turn": state.turn,
        "source": state.source,
        "transcript": state.transcript,
        "answer": state.answer,
        "last_answer": state.last_answer,
        "error": state.error,
        "notice": state.notice,
        "mic_error": state.mic_error,
        "mic_ready": state.mic_ready,
        "microphone": state.microphone,
    }


# ---- the pystray side ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrayOptions:
    settings: Settings
    history: Path
    log_file: Path | None = None
    use_hotkeys: bool = True
    save_choices: bool = True


class TrayApp:
    def __init__(self, options: TrayOptions) -> None:
        import pystray  # here, not at import: it needs a display (and picks its backend at import)

        self._pystray = pystray
        self.options = options
        settings = options.settings
        self.backend = pystray.Icon.__module__.rsplit(".", 1)[-1].lstrip("_")
        self.hotkey_note: str | None = None
        self.hotkeys: hotkeys.HotkeyListener | None = None
        self.devices: list[str] = []
        self._look: s.Look | None = None
        self._quitting = threading.Event()
        self.lock = control.TrayLock()
        self.engine = Engine(
            lambda event: self.controller.post(event),
            endpoint=settings.endpoint,
            microphone=settings.microphone,
            preroll_seconds=settings.preroll_seconds,
        )
        self.controller = Controller(
            self,
            self.engine.command,
            history=History(options.history),
            log_text=settings.log_text,
            microphone=settings.microphone,
            save_microphone=self._save_microphone if options.save_choices else None,
        )
        self.control_server = control.ControlServer(self.controller.control)
        self.icon = pystray.Icon(
            "sottovoce",
            icon=icons.icon(s.Look.UNREACHABLE),
            title="sottovoce",
            menu=self._menu(),
        )

    # ---- lifecycle ----
    def run(self) -> int:
        self.lock.acquire()
        try:
            self._list_devices()
            self.controller.start()
            # Hotkeys before the IO thread: once the icon shows "ready", a key press is heard.
            if self.options.use_hotkeys:
                self._start_hotkeys()
            else:
                self.hotkey_note = "hotkeys off (--no-hotkeys); use the menu or `sottovoce record --toggle`"
            self.control_server.start()
            self.engine.start()
            log.info("tray running (pystray backend %s, pid %d)", self.backend, os.getpid())
            try:
                self.icon.run(setup=self._setup)
            except Exception as exc:
                # pystray 0.19.5's gtk/appindicator backends raise from stop() (CloseNotification on a bus
                # that has no such notification): harmless once we are quitting.
                if not self._quitting.is_set():
                    raise
                log.debug("pystray raised while stopping (ignored): %s", exc)
            return 0
        finally:
            self._shutdown()

    def _setup(self, icon: Any) -> None:
        icon.visible = True
        self.render(self.controller.state)
        if self.backend in ("gtk", "appindicator"):
            from gi.repository import GLib

            for sig in (signal.SIGTERM, signal.SIGINT):
                GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, self._on_signal)
        else:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(ValueError):  # not the main thread: pystray's own handling stays
                    signal.signal(sig, lambda *_: self.controller.post(s.Quit()))

    def _on_signal(self) -> bool:
        log.info("signal received: quitting")
        self.controller.post(s.Quit())
        return True

    def _shutdown(self) -> None:
        # A last resort: exit 0 even if something below hangs (quitting must never hang the session).
        watchdog = threading.Timer(10.0, _hard_exit)
        watchdog.daemon = True
        watchdog.start()
        self._quitting.set()
        if self.hotkeys is not None:
            self.hotkeys.stop()
        self.engine.shutdown()
        self.control_server.stop()
        self.controller.finished.set()
        self.lock.release()
        watchdog.cancel()
        log.info("tray stopped")

    def _start_hotkeys(self) -> None:
        settings = self.options.settings
        controller = self.controller
        listener = hotkeys.HotkeyListener(
            settings.hotkey,
            settings.toggle_hotkey,
            on_ptt_down=lambda: controller.post(s.PttDown()),
            on_ptt_up=lambda: controller.post(s.PttUp()),
            on_toggle=lambda: controller.post(s.Toggle("toggle")),
        )
        note = listener.start()
        self.hotkeys = listener if listener.ptt is not None or listener.toggle is not None else None
        if note:
            self.hotkey_note = note
            log.warning("%s", note)
            self.controller.post(s.Tick())  # (re)render with the note

    # ---- View (called from the controller thread) ----
    def render(self, state: s.TrayState) -> None:
        self._in_gui(self._render, state)

    def _in_gui(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` where the GUI toolkit wants it. pystray's GTK backend already defers every call to its main
        loop; AppKit (macOS) must be touched from the main thread only."""
        if self.backend == "darwin":
            from PyObjCTools import AppHelper  # pyobjc comes with pystray on macOS

            AppHelper.callAfter(fn, *args)
        else:
            fn(*args)

    def _render(self, state: s.TrayState) -> None:
        icon = self.icon
        if state.look is not self._look:
            self._look = state.look
            icon.icon = icons.icon(state.look)
        tooltip = state.tooltip(self._hint())
        icon.title = tooltip.splitlines()[0] if self.backend == "gtk" else tooltip[:127]
        if self.backend == "gtk":
            status_icon = getattr(icon, "_status_icon", None)
            if status_icon is not None:
                from gi.repository import GLib

                GLib.idle_add(_set_tooltip, status_icon, tooltip)
        icon.update_menu()

    def notify(self, title: str, message: str) -> None:
        self._in_gui(self._notify, title, message)

    def _notify(self, title: str, message: str) -> None:
        try:
            self.icon.notify(message, title)
        except Exception as exc:  # no notification server: the tooltip and the log still tell
            log.debug("notification failed: %s", exc)

    def stop(self) -> None:
        self._quitting.set()
        try:
            self.icon.stop()
        except Exception as exc:
            log.debug("pystray stop raised (ignored): %s", exc)

    # ---- the menu ----
    def _hint(self) -> str:
        if self.hotkey_note:
            return "hotkeys unavailable: use the menu or `sottovoce record --toggle`"
        settings = self.options.settings
        parts = []
        if settings.hotkey:
            parts.append(f"hold {hotkeys.hint(settings.hotkey)} to talk")
        if settings.toggle_hotkey:
            parts.append(f"{hotkeys.hint(settings.toggle_hotkey)} toggles")
        return ", ".join(parts)

    def _menu(self) -> Any:
        pystray = self._pystray
        item, menu = pystray.MenuItem, pystray.Menu
        st = lambda: self.controller.state  # noqa: E731
        return menu(
            item(lambda _: st().status_line(self._hint()), None, enabled=False),
            item(
                lambda _: "Stop recording and ask" if st().recording else "Start recording",
                lambda: self.controller.post(s.Toggle("menu")),
                default=True,
            ),
            item(
                lambda _: f"Heard: {s.preview(st().transcript or '', s.PREVIEW_CHARS)}",
                None,
                enabled=False,
                visible=lambda _: bool(st().transcript) and not st().recording,
            ),
            item(
                lambda _: st().answer_item,
                lambda: self.controller.post(s.CopyAnswer()),
                enabled=lambda _: bool(st().last_answer),
            ),
            item("New conversation", lambda: self.controller.post(s.NewConversation())),
            menu.SEPARATOR,
            item("Microphone", menu(self._mic_items)),
            item("Open history", lambda: self._open(self.options.history)),
            item("Open log", lambda: self._open(self.options.log_file or log_path())),
            menu.SEPARATOR,
            item("Quit", lambda: self.controller.post(s.Quit())),
        )

    def _mic_items(self) -> Any:
        pystray = self._pystray
        chosen = self.controller.state.microphone

        def choose(name: str | None) -> Callable[[], None]:
            return lambda: self.controller.post(s.ChooseMicrophone(name))

        def is_chosen(name: str | None) -> Callable[[Any], bool]:
            return lambda _: chosen == name

        yield pystray.MenuItem("System default", choose(None), checked=is_chosen(None), radio=True)
        devices = sorted(set(self.engine.devices or self.devices))
        for name in devices:
            yield pystray.MenuItem(name, choose(name), checked=is_chosen(name), radio=True)
        if chosen and chosen not in devices:
            yield pystray.MenuItem(f"{chosen} (not found)", choose(chosen), checked=is_chosen(chosen), radio=True)

    def _list_devices(self) -> None:
        from .audio import MicrophoneError, list_input_devices

        try:
            self.devices = sorted({d.name for d in list_input_devices()})
        except MicrophoneError as exc:
            log.warning("%s", exc)
            self.devices = []

    def _save_microphone(self, name: str | None) -> None:
        path = prefs.save_setting("microphone", name)
        log.info("microphone %s saved in %s", name or "(system default)", path)

    def _open(self, path: Path) -> None:
        try:
            desktop.open_path(path)
        except desktop.DesktopError as exc:
            self.notify("sottovoce", str(exc))


def _set_tooltip(status_icon: Any, text: str) -> bool:
    status_icon.set_tooltip_text(text)
    return False


def _hard_exit() -> None:
    log.warning("shutdown did not finish within 10 s; exiting anyway")
    logging.shutdown()
    os._exit(0)
