"""Turn settings into the two model backends, on the engines ``sottovoce.daemon.engines`` chose, loading nothing yet."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

from sottovoce.client import config
from sottovoce.daemon import engines

from .base import ChatMessage, ChatModel, GenerationStep, ModelLoadError, ShouldStop, Transcriber

log = logging.getLogger(__name__)


def build_backends(settings: config.Settings) -> tuple[Transcriber, ChatModel]:
    """The transcriber and chat model; one that cannot be found is ``Unavailable`` (the daemon stays up and says
    why)."""
    transcriber: Transcriber
    chat: ChatModel
    try:
        transcriber = build_transcriber(engines.plan_stt(settings), settings)
    except ModelLoadError as exc:
        transcriber = Unavailable(settings.whisper_model, str(exc), engines.choose_engine("stt", settings.stt_engine))
    try:
        chat = build_chat_model(engines.plan_llm(settings), settings)
    except ModelLoadError as exc:
        chat = Unavailable(settings.llm_model, str(exc), engines.choose_engine("llm", settings.llm_engine))
    return transcriber, chat


def build_transcriber(plan: engines.Plan, settings: config.Settings) -> Transcriber:
    languages = config.parse_languages(settings.languages)
    if plan.engine == "faster-whisper":
        from .faster_whisper_backend import FasterWhisperTranscriber

        backend: Transcriber = FasterWhisperTranscriber(
            plan.model, compute_type=settings.whisper_compute_type, allowed_languages=languages
        )
    else:
        from .mlx_whisper_backend import MlxWhisperTranscriber

        backend = MlxWhisperTranscriber(
            plan.model, fp16=settings.fp16, allowed_languages=languages, prepare=_converter(plan)
        )
    _describe(backend, plan)
    return backend


def build_chat_model(plan: engines.Plan, settings: config.Settings) -> ChatModel:
    # No cache at all when disabled (the seed design, for the benchmark's baseline).
    caches = {} if settings.prompt_cache else {"max_conversations": 0, "max_system_prompts": 0}
    backend: ChatModel
    if plan.engine == "openai":
        from .openai_backend import OpenAIChatModel

        assert settings.llm_url is not None  # engines.plan_llm insists
        key = settings.llm_api_key or os.environ.get("OPENAI_API_KEY") or None
        backend = OpenAIChatModel(settings.llm_url, plan.model, api_key=key)
    elif plan.engine == "llama.cpp":
        from sottovoce.daemon.models import store

        from .llama_cpp_backend import LlamaCppChatModel

        gguf = Path(plan.model)
        in_store = (gguf.parent / store.MANIFEST).is_file()  # a store entry is known by its name, not its file's
        backend = LlamaCppChatModel(plan.model, name=gguf.parent.name if in_store else None, **caches)
    else:
        from .mlx_lm_backend import MlxChatModel

        backend = MlxChatModel(plan.model, prepare=_converter(plan), **caches)
    _describe(backend, plan)
    return backend


def _converter(plan: engines.Plan) -> Callable[[], str] | None:
    """For MLX: make the converted copy of a CTranslate2/GGUF store entry on first load (on the model thread)."""
    entry = plan.convert
    if entry is None:
        return None

    def convert() -> str:
        from sottovoce.daemon.models.errors import ModelImportError
        from sottovoce.daemon.models.importer import ensure_mlx_copy

        try:
            return str(ensure_mlx_copy(entry))
        except ModelImportError as exc:
            raise ModelLoadError(str(exc)) from exc

    return convert


def _describe(backend: Transcriber | ChatModel, plan: engines.Plan) -> None:
    backend.engine_reason = plan.reason
    log.info("%s: %s", "speech-to-text" if plan.stage == "stt" else "chat model", plan.describe())


class Unavailable:
    """Stands in for a model that cannot be found: the daemon stays up and reports why in `status` and errors."""

    def __init__(self, name: str, reason: str, engine: tuple[str, str] = ("none", "")) -> None:
        self.name = name
        self.engine, self.engine_reason = engine
        self._reason = reason

    def load(self) -> None:
        raise ModelLoadError(self._reason)

    def unload(self) -> None:
        pass

    def forget(self, cache_key: str) -> None:
        pass

    def transcribe(self, pcm: np.ndarray, *, language: str | None = None, prompt: str | None = None) -> NoReturn:
        raise ModelLoadError(self._reason)  # never reached: the worker only runs loaded models

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        should_stop: ShouldStop,
        cache_key: str | None = None,
    ) -> Iterator[GenerationStep]:
        raise ModelLoadError(self._reason)
