"""Fake model backends for unit tests of the daemon's logic (the real MLX path is tested with tiny models)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from sottovoce.daemon.backends.base import (
    ChatMessage,
    GenerationStep,
    ModelLoadError,
    ShouldStop,
    TranscriptResult,
)


class FakeTranscriber:
    """'Hears' the RMS level and length of the audio, so tests can tell which audio reached it."""

    name = "fake-whisper"
    engine = "fake"
    engine_reason = "unit test"

    def __init__(self, *, fail_load: str | None = None, delay: float = 0.0) -> None:
        self.fail_load = fail_load
        self.delay = delay
        self.calls: list[int] = []
        self.prompts: list[str | None] = []
        self.loads = self.unloads = 0

    def load(self) -> None:
        if self.fail_load:
            raise ModelLoadError(self.fail_load)
        self.loads += 1

    def unload(self) -> None:
        self.unloads += 1

    def transcribe(
        self, pcm: np.ndarray, *, language: str | None = None, prompt: str | None = None
    ) -> TranscriptResult:
        self.calls.append(pcm.size)
        self.prompts.append(prompt)
        time.sleep(self.delay)
        rms = float(np.sqrt(np.mean(np.square(pcm)))) if pcm.size else 0.0
        if rms < 1e-4:
            return TranscriptResult("", language or "en", True)
        return TranscriptResult(f"heard {pcm.size} samples at {rms:.3f}", language or "en", False, 1)


class FakeChat:
    """Answers by echoing the question word by word; ``gate`` can hold generation to test cancel and busy."""

    name = "fake-llm"
    engine = "fake"
    engine_reason = "unit test"

    def __init__(self, *, token_delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.token_delay = token_delay
        self.gate = gate
        self.prompts: list[list[ChatMessage]] = []
        self.cache_keys: list[str | None] = []
        self.forgotten: list[str] = []
        self.loads = self.unloads = 0

    def forget(self, cache_key: str) -> None:
        self.forgotten.append(cache_key)

    def load(self) -> None:
        self.loads += 1

    def unload(self) -> None:
        self.unloads += 1

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        should_stop: ShouldStop,
        cache_key: str | None = None,
    ) -> Iterator[GenerationStep]:
        self.prompts.append(list(messages))
        self.cache_keys.append(cache_key)
        words = f"you said: {messages[-1].content}".split()
        prompt_tokens = sum(len(m.content.split()) for m in messages)
        for n, word in enumerate(words[:max_tokens], start=1):
            if self.gate is not None:
                self.gate.wait(10)
            time.sleep(self.token_delay)
            if should_stop():
                yield GenerationStep("", prompt_tokens, n - 1, "cancelled")
                return
            last = n == len(words) or n == max_tokens
            reason = None if not last else ("stop" if n == len(words) else "length")
            yield GenerationStep(("" if n == 1 else " ") + word, prompt_tokens, n, reason, 0.001)
