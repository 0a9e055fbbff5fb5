"""What every Whisper backend does the same way, whatever runs the model.

- An energy gate before Whisper: silence and faint noise never reach the model (on them Whisper loops or
  hallucinates for seconds).
- Language detection restricted to the allowed languages (a short clip often scores a wrong language highest).
- The result: text with words in it, or an explicit no-speech result.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

import numpy as np

from sottovoce.client.protocol import SAMPLE_RATE

from .base import TranscriptResult

logger = logging.getLogger(__name__)

FRAME_SECONDS = 0.030
MIN_SPEECH_DBFS = -50.0
"""Quietest 30 ms frame RMS (dBFS, 0 = full-scale square wave) that can be speech. Speech at a desk microphone peaks
around -30..-10 dBFS; a quiet room's noise floor sits near -60 dBFS or lower."""


def loudest_frame_dbfs(
    pcm: np.ndarray, *, sample_rate: int = SAMPLE_RATE, frame_seconds: float = FRAME_SECONDS
) -> float:
    """RMS level in dBFS of the loudest ``frame_seconds`` frame of ``pcm``; ``-inf`` for digital silence or no audio."""
    samples = np.asarray(pcm, dtype=np.float64).reshape(-1)
    if samples.size == 0:
        return float("-inf")
    frame = max(1, round(sample_rate * frame_seconds))
    padded = np.pad(samples, (0, -samples.size % frame))  # a short tail frame reads a little quieter: harmless
    rms = np.sqrt(np.mean(np.square(padded.reshape(-1, frame)), axis=1))
    loudest = float(np.max(rms))
    if not np.isfinite(loudest) or loudest <= 0.0:
        return float("-inf")
    return 20.0 * float(np.log10(loudest))


def too_quiet(audio: np.ndarray, min_speech_dbfs: float | None) -> bool:
    """True when no 30 ms frame is loud enough to be speech (the gate is off when ``min_speech_dbfs`` is None)."""
    if min_speech_dbfs is None:
        return False
    level = loudest_frame_dbfs(audio)
    if level < min_speech_dbfs:
        logger.debug("no speech: loudest frame %.1f dBFS < %.1f; Whisper not run", level, min_speech_dbfs)
        return True
    return False


def has_words(text: str) -> bool:
    """False for "", "...", "♪" and the like: nothing a person said."""
    return any(ch.isalnum() for ch in text)


def normalise_languages(codes: Sequence[str] | None) -> tuple[str, ...]:
    """Lower case, stripped, each once, in order."""
    return tuple(dict.fromkeys(code.strip().lower() for code in codes or ()))


def usable_languages(
    allowed: tuple[str, ...], *, multilingual: bool, known: Collection[str], model_name: str
) -> tuple[str, ...]:
    """The allowed languages this model can detect; () when there is no restriction to apply."""
    if not allowed:
        return ()
    if not multilingual:
        if allowed != ("en",):
            logger.info("Whisper %s is English-only: languages %s ignored", model_name, allowed)
        return ()
    usable = tuple(code for code in allowed if code in known)
    if len(usable) < len(allowed):
        dropped = [code for code in allowed if code not in known]
        logger.warning(
            "Whisper %s does not know the language(s) %s: %s",
            model_name,
            ", ".join(dropped),
            f"detection restricted to {', '.join(usable)}" if usable else "detection not restricted",
        )
    return usable


def fixed_language(forced: str | None, *, multilingual: bool, allowed: tuple[str, ...]) -> str | None:
    """The language known without running detection: the one asked for, "en" for an English-only model, or the only
    allowed one; None when detection has to run."""
    if forced:
        return forced
    if not multilingual:
        return "en"
    if len(allowed) == 1:
        return allowed[0]
    return None


def result(text: str, language: str | None, kept_segments: int) -> TranscriptResult:
    """A transcript, or no speech when Whisper kept no segment or wrote nothing a person said."""
    text = text.strip()
    if not kept_segments or not has_words(text):
        return TranscriptResult("", language, True, 0)
    return TranscriptResult(text, language, False, kept_segments)
