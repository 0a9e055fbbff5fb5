"""Small desktop services with no GUI toolkit: the clipboard and opening a file, through the platform's tools.

Clipboard: ``pbcopy`` (macOS), ``wl-copy`` (Wayland), ``xclip`` or ``xsel`` (X11). Opening: ``open`` (macOS),
``xdg-open`` (Linux).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


class DesktopError(RuntimeError):
    pass


def clipboard_command(environ: dict[str, str] | None = None, platform: str | None = None) -> list[str] | None:
    environ = dict(os.environ) if environ is None else environ
    platform = platform or sys.platform
    candidates: list[list[str]] = []
    if platform == "darwin":
        candidates.append(["pbcopy"])
    if environ.get("WAYLAND_DISPLAY"):
        candidates.append(["wl-copy"])
    if environ.get("DISPLAY"):
        candidates += [["xclip", "-selection", "clipboard", "-in"], ["xsel", "--clipboard", "--input"]]
    for cmd in candidates:
        if shutil.which(cmd[0]):
            return cmd
    return None


def copy_to_clipboard(text: str) -> None:
    cmd = clipboard_command()
    if cmd is None:
        raise DesktopError("no clipboard tool found: install xclip (X11) or wl-clipboard (Wayland)")
    # xclip/wl-copy stay in the background to serve the selection: give them no pipes to hold open but stdin.
    try:
        subprocess.run(
            cmd,
            input=text.encode(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise DesktopError(f"copying failed ({' '.join(cmd)}): {exc}") from None


def open_path(path: Path) -> None:
    if not path.exists():
        raise DesktopError(f"{path} does not exist yet")
    opener = "open" if sys.platform == "darwin" else "xdg-open"
    if shutil.which(opener) is None:
        raise DesktopError(f"cannot open {path}: `{opener}` is not installed")
    try:
        subprocess.Popen(
            [opener, str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        raise DesktopError(f"cannot open {path}: {exc}") from None
