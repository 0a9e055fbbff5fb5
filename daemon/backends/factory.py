"""Turn settings into the two model backends, resolving model names without loading anything yet."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import NoReturn

import numpy as np

from sottovoce.client import config

from .base import ChatMessage, ChatModel, GenerationStep, ModelLoadError, ShouldStop, Transcriber

log = logging.getLogger(__name__)

# Imported from registry packages by `sottovoce models fetch-defaults`; used when the LLaMA-3 / Whisper hub
# defaults are not on this machine (no hub here, or a Linux box without them).
EMBEDDED_WHISPER = "whisper-base"
EMBEDDED_LLM = "smollm2-135m-instruct"


def build_backends(settings: config.Settings) -> tuple[Transcriber, ChatModel]:
    from .mlx_lm_backend import MlxChatModel
    from .mlx_whisper_backend import MlxWhisperTranscriber

    transcriber: Transcriber
    chat: ChatModel
    try:
        whisper_path = resolve_model(settings.whisper_model, "whisper", config.DEFAULT_WHISPER, EMBEDDED_WHISPER)
        transcriber = MlxWhisperTranscriber(
            whisper_path, fp16=settings.fp16, allowed_languages=config.parse_languages(settings.languages)
        )
    except ModelLoadError as exc:
        transcriber = Unavailable(settings.whisper_model, str(exc))
    try:
        llm_path = resolve_model(settings.llm_model, "llm", config.DEFAULT_LLM, EMBEDDED_LLM)
        # No cache at all when disabled (the seed design, for the benchmark's baseline).
        caches = {} if settings.prompt_cache else {"max_conversations": 0, "max_system_prompts": 0}
        chat = MlxChatModel(llm_path, **caches)
    except ModelLoadError as exc:
        chat = Unavailable(settings.llm_model, str(exc))
    return transcriber, chat


def resolve_model(spec: str, kind: str, hub_default: str, embedded: str) -> str:
    """A store name, folder or hub id -> what the MLX loader takes; the unchanged hub default falls back to the
    embedded model when the hub copy is not cached here."""
    from sottovoce.daemon.models import store

    if spec == hub_default and not _hub_cached(spec):
        try:
            path = store.resolve(embedded, kind)
        except ModelLoadError:
            pass
        else:
            log.info("%s is not on this machine; using the embedded %s model %s", spec, kind, embedded)
            return path
    return store.resolve(spec, kind)


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


class Unavailable:
    """Stands in for a model that cannot be found: the daemon stays up and reports why in `status` and errors."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
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
