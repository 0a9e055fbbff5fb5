"""Whisper on MLX (mlx-whisper), behind the ``Transcriber`` interface.

Decoding is the seed app's: mlx_whisper's 30 s windows, temperature fallback, log-prob / no-speech / compression
thresholds, and silent segments skipped. Added here: an energy gate before Whisper (silence and faint noise never
reach the model: on them Whisper loops or hallucinates for seconds), an explicit no-speech result after it, and
language detection restricted to a list of allowed languages (a short clip often scores a wrong language highest).

mlx / mlx_whisper are imported lazily so that importing this module never loads ``mlx.core`` before
``preload_openblas()`` ran.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import DecodingSettings, ModelLoadError, TranscriptResult
from .device import compute_dtype, prefers_half_precision
from .hub import model_folder

if TYPE_CHECKING:
    import mlx.nn as nn

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
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


def _has_words(text: str) -> bool:
    """False for "", "...", "♪" and the like: nothing a person said."""
    return any(ch.isalnum() for ch in text)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _cast_floats(model: nn.Module, dtype: Any) -> None:
    """Cast floating parameters (weights, quantization scales) to ``dtype``; keep packed integer weights.

    mlx_whisper's loader keeps the file's dtype (mlx-community checkpoints are float16), which is ~7x slower on the
    CPU than float32.
    """
    import mlx.core as mx
    from mlx.utils import tree_map

    def cast(p: mx.array) -> mx.array:
        return p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p

    model.update(tree_map(cast, model.parameters()))
    mx.eval(model.parameters())


class MlxWhisperTranscriber:
    """One mlx-whisper model folder (``config.json`` + ``weights.safetensors``) or a Hugging Face hub id; load and run
    on the model thread."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        decoding: DecodingSettings = DecodingSettings(),  # noqa: B008 - frozen dataclass, safe to share
        fp16: bool | None = None,
        min_speech_dbfs: float | None = MIN_SPEECH_DBFS,
        allowed_languages: Sequence[str] | None = None,
    ) -> None:
        """``fp16=None`` picks float16 on a GPU and float32 on the CPU; ``min_speech_dbfs=None`` turns the gate off.

        ``allowed_languages``: Whisper language codes that detection may pick (None or empty: any). Used only when
        ``transcribe`` is not given a language and the model is multilingual; an English-only model reports "en"
        (a language given to ``transcribe`` is passed on and reported as given, as before)."""
        self.spec = os.fspath(model)
        self.path = Path(model)
        self.name = self.path.name or self.spec
        self.decoding = decoding
        self.fp16 = fp16
        self.min_speech_dbfs = min_speech_dbfs
        self.allowed_languages = tuple(dict.fromkeys(code.strip().lower() for code in allowed_languages or ()))
        self._allowed: tuple[str, ...] = ()
        """``allowed_languages`` that the loaded model knows, in order; () = no restriction."""
        self._model: Any = None

    def load(self) -> None:
        # A missing folder that looks like "org/name" is looked up in the Hugging Face cache (mlx_whisper would do
        # that too, but with a traceback instead of a message saying how to get a model).
        self.path = model_folder(
            self.spec,
            what="Whisper model",
            folder_hint="run `sottovoce models fetch-defaults` or pass --whisper-model DIR",
        )
        from mlx_whisper.load_models import load_model

        if self.fp16 is None:
            self.fp16 = prefers_half_precision()
        dtype = compute_dtype(self.fp16)
        started = time.perf_counter()
        try:
            model = load_model(str(self.path), dtype=dtype)
            _cast_floats(model, dtype)
            self._model = model
            self._allowed = self._usable_languages()
            loaded = time.perf_counter()
            # Warm-up: first calls allocate and build kernels. One short greedy pass is enough (sample_len caps it).
            # A language, so that a multilingual model does not also run detection: one encoder pass, not two.
            warm_language = "en" if model.is_multilingual else None
            self._run(np.zeros(SAMPLE_RATE, dtype=np.float32), warm_language, temperature=(0.0,), sample_len=8)
            self._warm_fallback_sampling()
        except Exception as exc:
            self._model = None
            raise ModelLoadError(f"cannot load Whisper model from {self.path}: {_one_line(exc)}") from exc
        logger.debug(
            "loaded Whisper %s (fp16=%s) in %.2f s, warm-up %.2f s",
            self.name,
            self.fp16,
            loaded - started,
            time.perf_counter() - loaded,
        )

    def unload(self) -> None:
        """Free the weights (mlx_whisper's per-process model cache too, when it holds ours); ``load()`` brings them
        back."""
        if self._model is None:
            return
        import mlx.core as mx
        from mlx_whisper.transcribe import ModelHolder

        if ModelHolder.model is self._model:
            ModelHolder.model = None
            ModelHolder.model_path = None
        self._model = None
        mx.clear_cache()

    def _usable_languages(self) -> tuple[str, ...]:
        """The allowed languages this model can detect; () when there is no restriction to apply."""
        if not self.allowed_languages:
            return ()
        if not self._model.is_multilingual:
            if self.allowed_languages != ("en",):
                logger.info("Whisper %s is English-only: languages %s ignored", self.name, self.allowed_languages)
            return ()
        from mlx_whisper.tokenizer import get_tokenizer

        known = set(get_tokenizer(True, num_languages=self._model.num_languages).all_language_codes)
        usable = tuple(code for code in self.allowed_languages if code in known)
        if len(usable) < len(self.allowed_languages):
            dropped = [code for code in self.allowed_languages if code not in known]
            logger.warning(
                "Whisper %s does not know the language(s) %s: %s",
                self.name,
                ", ".join(dropped),
                f"detection restricted to {', '.join(usable)}" if usable else "detection not restricted",
            )
        return usable

    def _pick_language(self, audio: np.ndarray) -> str | None:
        """The most probable allowed language of the first 30 s window, or None to let mlx_whisper detect any.

        Done as ``mlx_whisper.transcribe`` does it (log-Mel of the whole clip padded with 30 s, first 3000 frames, in
        the compute dtype, ``model.detect_language``), with the choice limited to the allowed languages. Costs one
        encoder pass, as mlx_whisper's own detection does (the one it then skips).
        """
        if not self._allowed:
            return None
        if len(self._allowed) == 1:
            return self._allowed[0]
        from mlx_whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim

        model = self._model
        started = time.perf_counter()
        mel = log_mel_spectrogram(audio, n_mels=model.dims.n_mels, padding=N_SAMPLES)
        segment = pad_or_trim(mel, N_FRAMES, axis=-2).astype(compute_dtype(bool(self.fp16)))
        _, probs = model.detect_language(segment)
        best = max(self._allowed, key=lambda code: probs.get(code, 0.0))
        if logger.isEnabledFor(logging.DEBUG):
            overall = max(probs, key=probs.get)
            logger.debug(
                "language %s (p=%.2f) among %s; overall best %s (p=%.2f); %.2f s",
                best,
                probs.get(best, 0.0),
                ",".join(self._allowed),
                overall,
                probs[overall],
                time.perf_counter() - started,
            )
        return best

    def _warm_fallback_sampling(self) -> None:
        """Build the sampling kernel of every fallback temperature now rather than on the first hard utterance.

        MLX's CPU backend compiles fused kernels with the system C++ compiler, and mlx_whisper's compiled
        ``categorical(logits, temp)`` bakes each Python-float temperature into its own kernel: ~1-3 s per temperature
        the first time on this 2-core box. Kernels are cached on disk ($TMPDIR/mlx/<version>/cpu), so once they exist
        this costs milliseconds.
        """
        import mlx.core as mx
        from mlx_whisper.decoding import categorical

        logits = mx.zeros((1, self._model.dims.n_vocab), dtype=mx.float32)  # decoding's logits are float32
        for temperature in self.decoding.temperatures:
            if temperature > 0:
                mx.eval(categorical(logits, temperature))

    def transcribe(
        self, pcm: np.ndarray, *, language: str | None = None, prompt: str | None = None
    ) -> TranscriptResult:
        """``prompt``: text said just before this audio (Whisper's ``initial_prompt``): a recording transcribed
        stretch by stretch gives each stretch the text so far, for spelling, names and punctuation."""
        if self._model is None:
            raise RuntimeError("MlxWhisperTranscriber.transcribe() called before load()")
        audio = np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1)
        english_only = not self._model.is_multilingual
        forced = language or None
        # An English-only model has no language tokens and no detection: it says "en" unless told otherwise.
        language = forced or ("en" if english_only else None)
        if language is None and len(self._allowed) == 1:
            language = self._allowed[0]
        if self.min_speech_dbfs is not None:
            level = loudest_frame_dbfs(audio)
            if level < self.min_speech_dbfs:
                logger.debug("no speech: loudest frame %.1f dBFS < %.1f; Whisper not run", level, self.min_speech_dbfs)
                return TranscriptResult("", language, True, 0)
        if language is None:
            language = self._pick_language(audio)
        # Whisper keeps at most the last 223 prompt tokens itself; "" or whitespace would decode as a lone space.
        initial_prompt = prompt if prompt and prompt.strip() else None
        raw = self._run(
            audio,
            forced if english_only else language,  # mlx_whisper itself takes "en" for an English-only model
            temperature=self.decoding.temperatures,
            initial_prompt=initial_prompt,
        )
        return self._result(raw, language)

    def _run(self, audio: np.ndarray, language: str | None, **options: Any) -> dict[str, Any]:
        import mlx_whisper
        from mlx_whisper.transcribe import ModelHolder

        # mlx_whisper.transcribe() fetches its model from a per-process cache keyed by path only: point the cache
        # at our (cast, warmed) model so it neither reloads from disk nor runs another transcriber's model.
        ModelHolder.model = self._model
        ModelHolder.model_path = str(self.path)
        result: dict[str, Any] = mlx_whisper.transcribe(
            audio,
            path_or_hf_repo=str(self.path),
            verbose=None,  # False would draw a tqdm bar
            fp16=bool(self.fp16),
            logprob_threshold=self.decoding.logprob_threshold,
            no_speech_threshold=self.decoding.no_speech_threshold,
            compression_ratio_threshold=self.decoding.compression_ratio_threshold,
            language=language,
            **options,
        )
        return result

    @staticmethod
    def _result(raw: dict[str, Any], language: str | None) -> TranscriptResult:
        # mlx_whisper already dropped windows judged silent; it blanks instantaneous or empty segments.
        kept = [s for s in raw.get("segments", []) if str(s.get("text", "")).strip()]
        text = str(raw.get("text", "")).strip()
        detected = language or raw.get("language")
        if not kept or not _has_words(text):
            return TranscriptResult("", detected, True, 0)
        return TranscriptResult(text, detected, False, len(kept))
