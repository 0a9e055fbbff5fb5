"""Which engine runs each stage, and which model it loads: the one place that decides both.

Two stages: speech-to-text (``stt``: MLX's mlx-whisper, or CTranslate2's faster-whisper) and the chat model (``llm``:
MLX's mlx-lm, llama.cpp, or an OpenAI-compatible server). ``auto`` picks MLX on Apple Silicon (fastest there, Metal)
and faster-whisper + llama.cpp elsewhere (MLX's CPU backend is several times slower on a Linux CPU, see
bench/engines.md).

Models come from the store (``sottovoce models ...``), a path, or a Hugging Face hub id. The store keeps CTranslate2
Whisper folders and GGUF files as they are; MLX gets a converted copy, made on first use (``Plan.convert``). The
settings' unchanged defaults (LLaMA-3-8B and whisper-large-v3-turbo from the MLX hub) fall back to the embedded
models that ``sottovoce models fetch-defaults`` brings, when the hub copy is not on this machine or the engine cannot
run it.

Nothing here loads a model or imports an engine: the CLI's ``doctor`` and ``config show`` use it too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import platform
from pathlib import Path
from typing import Literal

from sottovoce.client import config
from sottovoce.daemon.backends.hub import looks_like_hub_id
from sottovoce.daemon.models import store
from sottovoce.daemon.models.errors import ModelLoadError

log = logging.getLogger(__name__)

Stage = Literal["stt", "llm"]
STT_ENGINES = ("auto", "mlx", "faster-whisper")
LLM_ENGINES = ("auto", "mlx", "llama.cpp", "openai")

EMBEDDED_WHISPER = "whisper-base"
"""Whisper for the MLX engine when the hub default is not on this machine."""
EMBEDDED_FAST_WHISPER = "whisper-tiny.en"
"""Whisper for faster-whisper when none is configured: on a 2-core CPU the base model's extra accuracy costs more
latency than a short question can afford (bench/engines.md)."""
EMBEDDED_LLM = "smollm2-135m-instruct"

_MODULES = {
    "mlx": ("mlx", "mlx_whisper", "mlx_lm"),
    "faster-whisper": ("faster_whisper",),
    "llama.cpp": ("llama_cpp",),
    "openai": ("openai",),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one stage will run: the engine, why, and what it loads."""

    stage: Stage
    engine: str
    reason: str
    """Why this engine (auto's reasoning, or "chosen in the settings")."""
    model: str
    """What the engine loads: a folder, a GGUF file, a hub id, or (openai) the server's model name."""
    note: str = ""
    """How the configured model became ``model`` (e.g. the embedded default standing in for an absent hub one)."""
    convert: store.ModelEntry | None = None
    """MLX only: a CTranslate2/GGUF store entry to convert on first use (``model`` is where the copy goes)."""

    def describe(self) -> str:
        """One line for `status`, `doctor` and `config show`."""
        return f"{self.engine} ({self.reason}): {self.model}" + (f" [{self.note}]" if self.note else "")


def apple_silicon(system: str | None = None, machine: str | None = None) -> bool:
    return (system or platform.system()) == "Darwin" and (machine or platform.machine()) == "arm64"


def installed(engine: str) -> bool:
    """Whether the engine's Python packages are importable (checked without importing them)."""
    return all(importlib.util.find_spec(module) is not None for module in _MODULES[engine])


def choose_engine(stage: Stage, setting: str, *, on_apple_silicon: bool | None = None) -> tuple[str, str]:
    """(engine, reason) for a stage; ``setting`` is the configured engine or "auto"."""
    if setting != "auto":
        return setting, "chosen in the settings"
    apple = apple_silicon() if on_apple_silicon is None else on_apple_silicon
    fast = "faster-whisper" if stage == "stt" else "llama.cpp"
    if apple:
        return "mlx", "auto: Apple Silicon, where MLX runs on the GPU"
    where = f"{platform.system() or 'this system'} {platform.machine()}".strip()
    if installed(fast):
        return fast, f"auto: {where}, not Apple Silicon"
    if installed("mlx"):
        return "mlx", f"auto: {fast} is not installed (pip install 'sottovoce[daemon]'); MLX instead"
    return fast, f"auto: {where}, not Apple Silicon ({fast} is not installed)"


def hub_cached(repo_id: str) -> bool:
    """Whether a hub id's snapshot is in the local Hugging Face cache (nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


# ---- resolving a model spec for an engine ---------------------------------------------------------------------


def _store_entry(spec: str, kind: store.Kind) -> store.ModelEntry | None:
    entry = store.find(spec)
    if entry is not None and entry.kind != kind:
        raise ModelLoadError(
            f"{spec!r} in {store.models_dir()} is {store.article(entry.kind)} model, not {store.article(kind)} model"
        )
    return entry


def _defaulted(spec: str, hub_default: str, engine: str, embedded: str) -> tuple[str, str]:
    """The configured spec, or the embedded model when the spec is the unchanged hub default that this engine cannot
    use here (not MLX, or not in the local hub cache)."""
    if spec != hub_default:
        return spec, ""
    if engine == "mlx" and (hub_cached(spec) or store.find(embedded) is None):
        return spec, ""  # the hub copy, or resolving the hub id says how to get a model
    why = "not on this machine" if engine == "mlx" else f"an MLX model, which {engine} cannot run"
    return embedded, f"the default {spec} is {why}: using the embedded {embedded}"


def _for_mlx(spec: str, kind: store.Kind) -> tuple[str, store.ModelEntry | None]:
    """MLX: an MLX store entry or folder, a CTranslate2/GGUF entry (converted on first use), or a hub id."""
    entry = _store_entry(spec, kind)
    if entry is not None:
        if entry.format in ("ct2", "gguf"):
            return str(store.mlx_copy_path(entry)), entry
        return str(entry.path), None
    path = Path(spec).expanduser()
    if path.exists():
        fmt = store.detect_format(path)
        want = "mlx-whisper" if kind == "whisper" else "mlx-lm"
        if fmt != want:
            raise ModelLoadError(
                f"{path} is {'not an MLX model' if fmt is None else f'a {fmt} model'}; the MLX engine needs {want}: "
                f"`sottovoce models import {path}` (converted for MLX on first use)"
            )
        return str(path), None
    if looks_like_hub_id(spec):
        return spec, None
    raise ModelLoadError(f"no {kind} model {spec!r} in {store.models_dir()}; {store.HOW_TO_GET}")


def _for_native(spec: str, kind: store.Kind, engine: str) -> str:
    """faster-whisper (a CTranslate2 folder) or llama.cpp (a GGUF file): from the store, a path, or (faster-whisper)
    a hub id of a CTranslate2 model."""
    want = "ct2" if kind == "whisper" else "gguf"
    what = "a CTranslate2 Whisper folder (model.bin)" if want == "ct2" else "a GGUF file"
    entry = _store_entry(spec, kind)
    path = entry.path if entry is not None else Path(spec).expanduser()
    if entry is not None or path.exists():
        fmt = entry.format if entry is not None else store.detect_format(path)
        if fmt == "gguf" and path.is_dir():
            path = store.gguf_file(path)
        if fmt == want:
            return str(path)
        mlx = "--stt-engine mlx" if kind == "whisper" else "--llm-engine mlx"
        raise ModelLoadError(
            f"{spec} is {'not a model' if fmt is None else f'a {fmt} model'}; {engine} needs {what}: "
            f"import one (`sottovoce models import PATH`), or run this model with {mlx}"
        )
    if kind == "whisper" and looks_like_hub_id(spec):
        return spec  # faster-whisper fetches CTranslate2 models from the hub itself (cache first)
    raise ModelLoadError(f"no {kind} model {spec!r} in {store.models_dir()}; {store.HOW_TO_GET}")


def _only_mlx_runs(spec: str) -> bool:
    """True when ``spec`` is an MLX model on this machine (a store entry or a folder): no other engine runs it."""
    entry = store.find(spec)
    fmt = entry.format if entry is not None else store.detect_format(Path(spec).expanduser())
    return fmt in ("mlx-whisper", "mlx-lm") and installed("mlx")


def _engine_for(stage: Stage, setting: str, spec: str) -> tuple[str, str]:
    """``choose_engine``, except that ``auto`` runs a local MLX model on MLX rather than refuse it."""
    engine, reason = choose_engine(stage, setting)
    if setting == "auto" and engine != "mlx" and _only_mlx_runs(spec):
        return "mlx", f"auto: {Path(spec).name} is an MLX model, which only MLX runs"
    return engine, reason


def plan_stt(settings: config.Settings) -> Plan:
    """The speech-to-text plan; raises ModelLoadError when the model cannot be found for the chosen engine."""
    engine, reason = _engine_for("stt", settings.stt_engine, settings.whisper_model.strip())
    embedded = EMBEDDED_WHISPER if engine == "mlx" else EMBEDDED_FAST_WHISPER
    spec, note = _defaulted(settings.whisper_model.strip(), config.DEFAULT_WHISPER, engine, embedded)
    if engine == "mlx":
        model, convert = _for_mlx(spec, "whisper")
        return Plan("stt", engine, reason, model, note, convert)
    return Plan("stt", engine, reason, _for_native(spec, "whisper", engine), note)


def plan_llm(settings: config.Settings) -> Plan:
    """The chat-model plan; raises ModelLoadError when the model cannot be found for the chosen engine."""
    engine, reason = _engine_for("llm", settings.llm_engine, settings.llm_model.strip())
    if engine == "openai":
        if not settings.llm_url:
            raise ModelLoadError("the openai engine needs the server's address: --llm-url http://HOST:PORT/v1")
        name = "" if settings.llm_model == config.DEFAULT_LLM else settings.llm_model
        return Plan("llm", engine, reason, name, f"server {settings.llm_url}")
    spec, note = _defaulted(settings.llm_model.strip(), config.DEFAULT_LLM, engine, EMBEDDED_LLM)
    if engine == "mlx":
        model, convert = _for_mlx(spec, "llm")
        return Plan("llm", engine, reason, model, note, convert)
    return Plan("llm", engine, reason, _for_native(spec, "llm", engine), note)


def describe(settings: config.Settings) -> dict[str, str]:
    """Per stage, one line saying which engine runs it, why, and on what (or why it cannot)."""
    lines = {}
    for stage, planner in (("stt", plan_stt), ("llm", plan_llm)):
        try:
            lines[stage] = planner(settings).describe()
        except ModelLoadError as exc:
            engine, reason = choose_engine(stage, getattr(settings, f"{stage}_engine"))  # type: ignore[arg-type]
            lines[stage] = f"{engine} ({reason}): no model: {exc}"
    return lines
