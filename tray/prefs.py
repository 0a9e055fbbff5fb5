"""Remembering a choice made in the tray (the microphone) in the user's config file.

The config file is TOML with flat top-level keys (see ``client/config.py``); this rewrites one key's line, or
adds it, and leaves every other line (comments included) as it was. The result is parsed back before it
replaces the file, so a write never leaves a config that ``sottovoce`` cannot read.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from pathlib import Path

from sottovoce.client import paths


class PrefsError(RuntimeError):
    pass


def toml_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # A JSON string is a valid TOML basic string (same escapes: \" \\ \n \t \uXXXX ...).
    return json.dumps(value, ensure_ascii=False)


def update_text(text: str, key: str, value: str | int | float | bool | None) -> str:
    """``text`` with top-level ``key`` set to ``value`` (None removes it)."""
    lines = text.splitlines()
    key_re = re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*=")
    first_table = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
    new_line = None if value is None else f"{key} = {toml_value(value)}"
    for i in range(first_table):
        if key_re.match(lines[i]):
            if new_line is None:
                del lines[i]
            else:
                lines[i] = new_line
            break
    else:
        if new_line is not None:
            lines.insert(first_table, new_line)
    return "\n".join(lines) + "\n" if lines else ""


def save_setting(key: str, value: str | int | float | bool | None, path: Path | None = None) -> Path:
    path = path or paths.config_file()
    try:
        old = path.read_text(encoding="utf-8") if path.exists() else ""
    except OSError as exc:
        raise PrefsError(f"cannot read {path}: {exc}") from None
    new = update_text(old, key, value)
    try:
        tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        raise PrefsError(f"{path} would not be valid TOML after setting {key} ({exc}); left unchanged") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".config-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        os.replace(tmp, path)
    except OSError as exc:
        raise PrefsError(f"cannot write {path}: {exc}") from None
    return path
