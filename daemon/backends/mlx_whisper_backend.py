"""Whisper on MLX (mlx-whisper), behind the ``Transcriber`` interface.

Decoding is the seed app's: mlx_whisper's 30 s windows, temperature fallback, log-prob / no-speech / compression
thresholds, and silent segments skipped. What every Whisper backend adds (energy gate, allowed languages, no-speech
result) is ``whisper_common``'s. The encoder's output for a window is kept while that window is decoded, so language
detection and each fallback temperature do not run the encoder again (mlx_whisper would, once each).

mlx / mlx_whisper are imported lazily so that importing this module never loads ``mlx.core`` before
``preload_openblas()`` ran.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import whisper_common as common
from .base import DecodingSettings, ModelLoadError, TranscriptResult, one_line
from .device import compute_dtype, prefers_half_precision
from .hub import model_folder

if TYPE_CHECKING:
    import mlx.nn as nn

logger = logging.getLogger(__name__)

SAMPLE_RATE = common.SAMPLE_RATE
MIN_SPEECH_DBFS = common.MIN_SPEECH_DBFS


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

    engine = "mlx"
    engine_reason = ""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        decoding: DecodingSettings = DecodingSettings(),  # noqa: B008 - frozen dataclass, safe to share
        fp16: bool | None = None,
        min_speech_dbfs: float | None = MIN_SPEECH_DBFS,
        allowed_languages: Sequence[str] | None = None,
        prepare: Callable[[], str] | None = None,
    ) -> None:
        """``fp16=None`` picks float16 on a GPU and float32 on the CPU; ``min_speech_dbfs=None`` turns the gate off;
        ``prepare``: called at load, returns the folder to load (it converts a store model for MLX on first use).

        ``allowed_languages``: Whisper language codes that detection may pick (None or empty: any). Used only when
        ``transcribe`` is not given a language and the model is multilingual; an English-only model reports "en"
        (a language given to ``transcribe`` is passed on and reported as given, as before)."""
        self.spec = os.fspath(model)
        self.path = Path(model)
        self.name = self.path.name or self.spec
        self.decoding = decoding
        self.fp16 = fp16
        self.min_speech_dbfs = min_speech_dbfs
        self.allowed_languages = common.normalise_languages(allowed_languages)
        self.prepare = prepare
        self._allowed: tuple[str, ...] = ()
        """``allowed_languages`` that the loaded model knows, in order; () = no restriction."""
        self._model: Any = None

    def load(self) -> None:
        if self.prepare is not None:
            self.spec = self.prepare()
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
            model.encoder = reusing_encoder(model.encoder)
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
            raise ModelLoadError(f"cannot load Whisper model from {self.path}: {one_line(exc)}") from exc
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
        from mlx_whisper.tokenizer import get_tokenizer

        multilingual = self._model.is_multilingual
        known = get_tokenizer(True, num_languages=self._model.num_languages).all_language_codes if multilingual else ()
        return common.usable_languages(
            self.allowed_languages, multilingual=multilingual, known=known, model_name=self.name
        )

    def _pick_language(self, audio: np.ndarray) -> str:
        """The most probable (allowed) language of the first 30 s window.

        Scored on the window exactly as decoding will cut it (the clip's log-Mel frames, zero-padded to 3000), so the
        encoder output that detection computes is the one decoding reuses (``reusing_encoder``): one encoder pass,
        where mlx_whisper's own detection (on the log-Mel of the padding) costs a second one.
        """
        from mlx_whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim

        model = self._model
        started = time.perf_counter()
        mel = log_mel_spectrogram(audio, n_mels=model.dims.n_mels, padding=N_SAMPLES)
        content_frames = mel.shape[-2] - N_FRAMES
        window = mel[: min(N_FRAMES, content_frames)]
        segment = pad_or_trim(window, N_FRAMES, axis=-2).astype(compute_dtype(bool(self.fp16)))
        _, probs = model.detect_language(segment)
        best = max(self._allowed or probs, key=lambda code: probs.get(code, 0.0))
        logger.debug(
            "language %s (p=%.2f)%s; %.2f s",
            best,
            probs.get(best, 0.0),
            f" among {','.join(self._allowed)}" if self._allowed else "",
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
        language = common.fixed_language(forced, multilingual=not english_only, allowed=self._allowed)
        if common.too_quiet(audio, self.min_speech_dbfs):
            return TranscriptResult("", language, True, 0)
        try:
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
        finally:
            self._model.encoder.forget()  # the person's audio: keep its features no longer than needed
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
        return common.result(str(raw.get("text", "")), language or raw.get("language"), len(kept))


def _reusing_encoder_class() -> type:
    import mlx.core as mx
    import mlx.nn as nn

    class ReusingEncoder(nn.Module):
        """Wraps Whisper's audio encoder: the same window (language detection, then decoding at each fallback
        temperature) is encoded once. Holds one window, until ``forget``."""

        def __init__(self, encoder: nn.Module) -> None:
            super().__init__()
            self.inner = encoder
            self._last: tuple[Any, Any] | None = None

        def __call__(self, mel: Any) -> Any:
            last = self._last
            if last is not None and last[0].shape == mel.shape and bool(mx.array_equal(last[0], mel)):
                return last[1]
            features = self.inner(mel)
            self._last = (mel, features)
            return features

        def forget(self) -> None:
            self._last = None

    return ReusingEncoder


def reusing_encoder(encoder: Any) -> Any:
    """``encoder`` wrapped to encode each window once (the class is built on first use: mlx is imported lazily)."""
    return _reusing_encoder_class()(encoder)
