"""Small interfaces between the daemon's logic and the models.

The model thread calls these; everything crossing them is numpy arrays and plain Python values, so the logic can be
tested with fakes and the real MLX path stays one obvious class per model (``mlx_whisper_backend``, ``mlx_lm_backend``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

# Re-exported: every backend raises these.
from sottovoce.daemon.models.errors import ModelLoadError as ModelLoadError
from sottovoce.daemon.models.errors import ModelRuntimeError as ModelRuntimeError

ShouldStop = Callable[[], bool]
"""Polled between decoding steps; True means the ask was cancelled and the backend should return early."""


@dataclasses.dataclass(frozen=True)
class TranscriptResult:
    text: str
    language: str | None
    no_speech: bool
    """True when nothing was said (silence or noise): the LLM is not called."""
    segments: int = 0
    """Number of kept (non-silent) Whisper segments."""


@dataclasses.dataclass(frozen=True)
class DecodingSettings:
    """The seed app's Whisper decoding, kept as is (see README)."""

    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    logprob_threshold: float = -1.0
    no_speech_threshold: float = 0.6
    compression_ratio_threshold: float = 2.4


class Transcriber(Protocol):
    name: str
    engine: str
    """"mlx", "faster-whisper", ... (what `status` reports)."""
    engine_reason: str
    """Why this engine runs the stage (set by the factory from the engine choice)."""

    def load(self) -> None:
        """Load the weights (on the model thread; again after `unload`). Raises ModelLoadError."""

    def unload(self) -> None:
        """Free the weights (keep-alive ran out); `load` brings them back."""

    def transcribe(
        self, pcm: np.ndarray, *, language: str | None = None, prompt: str | None = None
    ) -> TranscriptResult:
        """16 kHz mono float32 PCM -> text. ``prompt``: text said just before (Whisper's initial_prompt), so a
        recording transcribed stretch by stretch keeps its context."""


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclasses.dataclass(frozen=True)
class GenerationStep:
    """One step of a streamed answer."""

    text: str
    """New text since the previous step (may be empty while a multi-byte character is incomplete)."""
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str | None = None
    """None while generating; "stop" (end of turn), "length" (max_tokens) or "cancelled" on the last step."""
    prompt_seconds: float = 0.0
    """Time spent on the prompt (prefill), known from the first step on."""
    cached_tokens: int = 0
    """Prompt tokens whose KV cache was reused (not prefilled again)."""


class ChatModel(Protocol):
    name: str
    engine: str
    engine_reason: str

    def load(self) -> None:
        """Load the weights and tokenizer (on the model thread; again after `unload`). Raises ModelLoadError."""

    def unload(self) -> None:
        """Free the weights and every kept KV cache (keep-alive ran out); `load` brings them back."""

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        should_stop: ShouldStop,
        cache_key: str | None = None,
    ) -> Iterator[GenerationStep]:
        """Apply the chat template and yield the answer as it is generated; the last step has a finish_reason.

        With ``cache_key`` (one per conversation), the KV cache of this prompt and answer is kept, and the next call
        with the same key prefills only the tokens after the longest prefix it shares with them."""

    def forget(self, cache_key: str) -> None:
        """Drop the KV cache kept for ``cache_key`` (the client reset or went away)."""


# ---- helpers every backend uses -------------------------------------------------------------------------------


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line, for ModelLoadError messages (the traceback goes to the debug log)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def never() -> bool:
    """A ``ShouldStop`` that never stops (warm-up generations)."""
    return False


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (prompt caches reuse that much of a kept KV cache)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def role_lines(messages: Sequence[ChatMessage], *, add_generation_prompt: bool) -> str:
    """The prompt of a model without a chat template: a plain transcript that ends where the assistant's turn
    starts."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + ("assistant:" if add_generation_prompt else "")


def system_prefix_length(
    render: Callable[[Sequence[ChatMessage]], list[int]], messages: Sequence[ChatMessage], prompt: Sequence[int]
) -> int:
    """How many leading ``prompt`` tokens come from the system message alone (0 without one); ``render`` renders
    messages without the assistant's header. Whatever the template does at the boundary, the tokens both renderings
    share are a valid KV prefix."""
    if not messages or messages[0].role != "system":
        return 0
    try:
        alone = render(messages[:1])
    except Exception:  # some templates refuse a conversation without a user turn
        logging.getLogger(__name__).debug("chat template cannot render the system message alone: no system cache")
        return 0
    return common_prefix_length(alone, prompt)
