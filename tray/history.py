"""The tray's record of what was asked and answered: one JSON object per line, appended after every turn.

``$SOTTOVOCE_HISTORY`` if set, else ``history.jsonl`` in the per-user data folder (created 0700, the file 0600:
it holds what the person said). The menu's "Open history" opens this file.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

from sottovoce.client import paths

from .state import RecordTurn

log = logging.getLogger(__name__)

ENV = "SOTTOVOCE_HISTORY"


def history_path() -> Path:
    if override := os.environ.get(ENV):
        return Path(override).expanduser()
    return paths.data_dir() / "history.jsonl"


def log_path() -> Path:
    return paths.data_dir() / "tray.log"


def entry(record: RecordTurn, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object written for one turn."""
    out: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "turn": record.turn,
        "source": record.source,
        "transcript": record.transcript,
        "answer": record.answer,
        "no_speech": record.no_speech,
        "error": {"code": record.error_code, "text": record.error} if record.error_code else None,
    }
    out.update(record.details)
    out.update(extra or {})
    return out


class History:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or history_path()

    def append(self, record: RecordTurn, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        line = entry(record, extra)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        except OSError as exc:
            log.error("cannot write the history to %s: %s", self.path, exc)
        return line

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
