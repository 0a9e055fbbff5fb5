"""Whisper on CTranslate2 (faster-whisper), behind the ``Transcriber`` interface: the fast engine on a Linux CPU.

Same behaviour as the MLX backend (``whisper_common``: energy gate, allowed languages, no-speech result) and the
seed's decoding (greedy at 0.0 with temperature fallback to 1.0, log-prob -1.0, no-speech 0.6, compression 2.4,
windows judged silent skipped). faster-whisper's own defaults differ (beam search of 5, best of 5): they are set back
to the seed's here.

Language detection reuses the encoder output: faster-whisper's ``transcribe`` would encode the first 30 s window once
to detect the language and again to decode it. Here the first window is encoded once, its language scored (among
the allowed ones), and the model's ``encode`` hands the kept output to the decoding that follows.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import openmp
from . import whisper_common as common
from .base import DecodingSettings, ModelLoadError, TranscriptResult, one_line

logger = logging.getLogger(__name__)

COMPUTE_TYPES = ("int8", "int8_float32", "float32", "float16", "int8_float16", "bfloat16", "default")


def _whisper_model_class() -> type:
    """faster-whisper's ``WhisperModel`` with a one-window memory in ``encode`` (imported lazily: ctranslate2 is
    heavy, and the daemon's other engines never need it)."""
    from faster_whisper import WhisperModel

    class ReusingWhisperModel(WhisperModel):
        """``encode`` returns the last output again for the same features: language detection and every fallback
        temperature share one encoder pass per window."""

        _last: tuple[np.ndarray, Any] | None = None

        def encode(self, features: np.ndarray) -> Any:
            last = self._last
            if last is not None and last[0].shape == features.shape and np.array_equal(last[0], features):
                return last[1]
            output = super().encode(features)
            self._last = (np.array(features, copy=True), output)
            return output

        def forget_window(self) -> None:
            self._last = None

    return ReusingWhisperModel


class FasterWhisperTranscriber:
    """One CTranslate2 Whisper folder (``model.bin``, ``config.json``, ``tokenizer.json``); load and run on the model
    thread."""

    engine = "faster-whisper"
    engine_reason = ""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        decoding: DecodingSettings = DecodingSettings(),  # noqa: B008 - frozen dataclass, safe to share
        compute_type: str = "int8",
        threads: int = 0,
        min_speech_dbfs: float | None = common.MIN_SPEECH_DBFS,
        allowed_languages: Sequence[str] | None = None,
    ) -> None:
        """``compute_type``: CTranslate2's (int8 is as accurate as float32 here and smaller, see bench/engines.md);
        ``threads``: CPU threads (0 = one per core). Other arguments as for the MLX backend."""
        if compute_type not in COMPUTE_TYPES:
            raise ValueError(f"compute_type must be one of {', '.join(COMPUTE_TYPES)}, got {compute_type!r}")
        self.path = Path(model)
        self.name = self.path.name or os.fspath(model)
        self.decoding = decoding
        self.compute_type = compute_type
        self.threads = threads or os.cpu_count() or 1  # CTranslate2 would start 4 threads even on 2 cores
        self.min_speech_dbfs = min_speech_dbfs
        self.allowed_languages = common.normalise_languages(allowed_languages)
        self._allowed: tuple[str, ...] = ()
        self._model: Any = None

    def load(self) -> None:
        if not (self.path / "model.bin").is_file():
            raise ModelLoadError(
                f"Whisper model not found: {self.path} has no model.bin (a CTranslate2 folder); "
                "run `sottovoce models fetch-defaults` or `sottovoce models import DIR`"
            )
        openmp.wait_passively()  # before the engine's OpenMP runtime starts
        started = time.perf_counter()
        try:
            model = _whisper_model_class()(
                str(self.path), device="cpu", compute_type=self.compute_type, cpu_threads=self.threads
            )
            self._model = model
            self._allowed = common.usable_languages(
                self.allowed_languages,
                multilingual=model.model.is_multilingual,
                known=model.supported_languages,
                model_name=self.name,
            )
            loaded = time.perf_counter()
            # Warm-up: the first call allocates CTranslate2's buffers (a few hundred ms on this CPU).
            self._decode(np.zeros(common.SAMPLE_RATE, dtype=np.float32), "en", None, temperatures=(0.0,))
        except Exception as exc:
            self._model = None
            raise ModelLoadError(f"cannot load Whisper model from {self.path}: {one_line(exc)}") from exc
        logger.debug(
            "loaded Whisper %s (CTranslate2 %s) in %.2f s, warm-up %.2f s",
            self.name,
            self.compute_type,
            loaded - started,
            time.perf_counter() - loaded,
        )

    def unload(self) -> None:
        """Free the weights; ``load()`` brings them back."""
        self._model = None

    @property
    def multilingual(self) -> bool:
        return bool(self._loaded().model.is_multilingual)

    def _loaded(self) -> Any:
        if self._model is None:
            raise RuntimeError("FasterWhisperTranscriber.transcribe() called before load()")
        return self._model

    def transcribe(
        self, pcm: np.ndarray, *, language: str | None = None, prompt: str | None = None
    ) -> TranscriptResult:
        """``prompt``: text said just before this audio (Whisper's ``initial_prompt``)."""
        model = self._loaded()
        audio = np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1)
        language = common.fixed_language(language or None, multilingual=self.multilingual, allowed=self._allowed)
        if common.too_quiet(audio, self.min_speech_dbfs):
            return TranscriptResult("", language, True, 0)
        model.forget_window()
        if language is None:
            language = self._detect(audio)
        # "" or whitespace would decode as a lone space; Whisper keeps the last 223 prompt tokens itself.
        initial_prompt = prompt if prompt and prompt.strip() else None
        try:
            return self._decode(audio, language, initial_prompt, temperatures=self.decoding.temperatures)
        finally:
            model.forget_window()  # the features are the person's audio: keep them no longer than needed

    def _detect(self, audio: np.ndarray) -> str:
        """The most probable (allowed) language of the first 30 s window, scored on the encoder output that decoding
        then reuses. The window is cut as faster-whisper's decoding cuts it, so that ``encode`` sees the same
        features twice."""
        from faster_whisper.audio import pad_or_trim

        model = self._model
        started = time.perf_counter()
        features = model.feature_extractor(audio)
        content_frames = features.shape[-1] - 1
        window = pad_or_trim(features[:, : min(model.feature_extractor.nb_max_frames, content_frames)])
        scores = model.model.detect_language(model.encode(window))[0]  # [(token "<|en|>", p), ...], best first
        probs = {token[2:-2]: float(p) for token, p in scores}
        code = max(self._allowed, key=lambda c: probs.get(c, 0.0)) if self._allowed else scores[0][0][2:-2]
        logger.debug(
            "language %s (p=%.2f)%s in %.3f s",
            code,
            probs.get(code, 0.0),
            f" among {','.join(self._allowed)}" if self._allowed else "",
            time.perf_counter() - started,
        )
        return code

    def _decode(
        self, audio: np.ndarray, language: str, initial_prompt: str | None, *, temperatures: Sequence[float]
    ) -> TranscriptResult:
        segments, _info = self._model.transcribe(
            audio,
            language=language if self.multilingual else None,
            task="transcribe",
            beam_size=1,  # the seed's greedy decoding (faster-whisper defaults to a beam of 5)
            best_of=1,
            temperature=list(temperatures),
            log_prob_threshold=self.decoding.logprob_threshold,
            no_speech_threshold=self.decoding.no_speech_threshold,
            compression_ratio_threshold=self.decoding.compression_ratio_threshold,
            condition_on_previous_text=True,
            initial_prompt=initial_prompt,
            vad_filter=False,  # the daemon's own voice-activity detection and energy gate run before this
            without_timestamps=False,
        )
        # faster-whisper yields only the segments of windows it did not judge silent.
        kept = [s for s in segments if s.text.strip()]
        return common.result("".join(s.text for s in kept), language, len(kept))
