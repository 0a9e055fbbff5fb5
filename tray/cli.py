"""`sottovoce tray` and `sottovoce record`. Importing this module is cheap: no pystray, sounddevice or pynput."""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_TIMEOUT = 4

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tray = subparsers.add_parser(
        "tray",
        help="run the tray icon: push-to-talk hotkey, microphone, answers in the menu",
        description="Run the sottovoce tray: hold the push-to-talk key (or use the menu) to ask by voice. "
        "It connects to the daemon when the daemon appears. See docs/tray.md.",
    )
    tray.add_argument("--endpoint", help="daemon endpoint (default: from config / SOTTOVOCE_ENDPOINT)")
    tray.add_argument("--microphone", help="input device name (default: config `microphone`, else the system's)")
    tray.add_argument("--hotkey", help="push-to-talk keys, e.g. '<ctrl>+<alt>+<space>' (config `hotkey`)")
    tray.add_argument("--toggle-hotkey", help="toggle keys, e.g. '<ctrl>+<alt>+t'; 'none' disables it")
    tray.add_argument("--preroll-seconds", type=float, help="audio kept from before the press (0 = mic open "
                      "only while recording)")  # fmt: skip
    tray.add_argument("--no-hotkeys", action="store_true", help="no global hotkeys (menu and `record` only)")
    tray.add_argument("--history", type=Path, help="history file (default: $SOTTOVOCE_HISTORY, else the data dir)")
    tray.add_argument("--log-file", type=Path, help="log file (default: tray.log in the data dir)")
    tray.add_argument("--log-text", action="store_true", default=None, help="log transcripts and answers")
    tray.add_argument("--list-microphones", action="store_true", help="print the input devices and exit")
    tray.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    tray.set_defaults(func=run_tray)

    record = subparsers.add_parser(
        "record",
        help="drive the running tray: start/stop/toggle a recording (bind a desktop shortcut to --toggle)",
        description="Control the running `sottovoce tray` through its private control socket. Where global "
        "hotkeys cannot work (Wayland), bind a desktop keyboard shortcut to `sottovoce record --toggle`.",
    )
    action = record.add_mutually_exclusive_group(required=True)
    for name, text in (
        ("toggle", "start recording, or stop and ask"),
        ("start", "start recording"),
        ("stop", "stop recording and ask"),
        ("status", "print the tray's state"),
        ("quit", "quit the tray"),
    ):
        action.add_argument(f"--{name}", dest="cmd", action="store_const", const=name, help=text)
    record.add_argument("--wait", action="store_true", help="after stopping, wait for the answer and print it")
    record.add_argument("--json", action="store_true", help="print the state as JSON")
    record.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")
    record.set_defaults(func=run_record)


# ---- sottovoce tray ----


def run_tray(args: argparse.Namespace) -> int:
    from sottovoce.client import config

    from . import hotkeys
    from .history import history_path, log_path

    flags: dict[str, Any] = {
        "endpoint": args.endpoint,
        "microphone": args.microphone,
        "hotkey": args.hotkey,
        "preroll_seconds": args.preroll_seconds,
        "log_text": args.log_text,
    }
    if args.toggle_hotkey is not None:
        flags["toggle_hotkey"] = args.toggle_hotkey
    try:
        settings, _ = config.load(flags)
    except config.ConfigError as exc:
        print(f"sottovoce tray: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if settings.toggle_hotkey is not None and settings.toggle_hotkey.strip().lower() in ("", "none", "off"):
        import dataclasses

        settings = dataclasses.replace(settings, toggle_hotkey=None)
    try:
        for spec in (settings.hotkey, settings.toggle_hotkey):
            if spec:
                hotkeys.parse_spec(spec)
    except hotkeys.HotkeyError as exc:
        print(f"sottovoce tray: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.list_microphones:
        return _list_microphones()

    log_file = args.log_file or log_path()
    _configure_logging(log_file, args.verbose)

    from . import control
    from .app import TrayApp, TrayOptions

    options = TrayOptions(
        settings=settings,
        history=args.history or history_path(),
        log_file=log_file,
        use_hotkeys=not args.no_hotkeys,
    )
    try:
        app = TrayApp(options)
    except Exception as exc:  # pystray cannot find a display / backend
        log.error("cannot start the tray icon: %s", exc)
        return EXIT_FAILED
    try:
        return app.run()
    except control.TrayAlreadyRunning as exc:
        log.error("%s", exc)
        return EXIT_FAILED


def _list_microphones() -> int:
    from .audio import MicrophoneError, list_input_devices

    try:
        devices = list_input_devices()
    except MicrophoneError as exc:
        print(f"sottovoce tray: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not devices:
        print("no input devices found", file=sys.stderr)
        return EXIT_FAILED
    for dev in devices:
        mark = "*" if dev.is_default else " "
        print(f"{mark} {dev.name}  ({dev.hostapi}, {dev.default_rate:.0f} Hz)")
    return 0


def _configure_logging(log_file: Path, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(fmt)
    root.addHandler(stderr)
    try:
        log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=1_000_000, backupCount=2)
        handler.setFormatter(fmt)
        root.addHandler(handler)
    except OSError as exc:
        log.warning("cannot write the log file %s: %s", log_file, exc)
    for noisy in ("PIL", "pystray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---- sottovoce record ----


def run_record(args: argparse.Namespace) -> int:
    from . import control

    waited = False
    try:
        state = control.send_command(args.cmd)
        if args.wait and args.cmd in ("toggle", "stop") and state.get("phase") == "thinking":
            state = control.wait_for_turn(int(state["turn"]), timeout=args.timeout)
            waited = True
    except control.TrayNotRunning as exc:
        print(f"sottovoce record: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except TimeoutError as exc:
        print(f"sottovoce record: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except RuntimeError as exc:
        print(f"sottovoce record: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(state, ensure_ascii=False))
    elif waited:
        if state.get("phase") == "error":
            print(f"sottovoce record: {state.get('error')}", file=sys.stderr)
            return EXIT_FAILED
        if state.get("transcript"):
            print(f"» {state['transcript']}")
        print(state.get("last_answer") or state.get("notice") or "")
    else:
        print(state.get("phase", "?"))
    if args.cmd == "status" and not state.get("connected"):
        return EXIT_FAILED
    return 0
