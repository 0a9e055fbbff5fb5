"""The `Transcriber` promise, on every engine (mlx-whisper and faster-whisper) and the small real models.

Every test body runs on each engine; what differs per engine (where to spy, what the engine's own output looks like,
how to count encoder passes) lives in the small adapters below. The models come from the store
(`tests/real_models.py`): CTranslate2 folders for faster-whisper, their converted copies for MLX.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import real_models  # type: ignore[import-not-found]
from speech import needs_espeak, say  # type: ignore[import-not-found]

from sottovoce.daemon.backends.base import DecodingSettings, ModelLoadError, Transcriber, TranscriptResult

# slow: mlx-whisper on the CPU takes seconds per clip, and each module-scoped model load more.
pytestmark = [
    pytest.mark.realmodels,
    pytest.mark.slow,
    real_models.needs_real_models,
    needs_espeak,
    pytest.mark.timeout(600),
]

SR = 16_000
TINY = "whisper-tiny.en"
BASE = "whisper-base"
QUESTION = "What is the capital of France?"
GERMAN = "Guten Tag, wie geht es Ihnen heute?"


def noise(seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    """White noise whose RMS is ``dbfs``."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * SR)) * 10 ** (dbfs / 20)).astype(np.float32)


def words(text: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


# ------------------------------------------------------------------------------------------- engine adapters


@dataclasses.dataclass
class Calls:
    """Keyword arguments of each call that reached the engine's transcription."""

    kwargs: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class MlxEngine:
    name = "mlx"

    @staticmethod
    def at(path: Path, **kwargs: Any) -> Transcriber:
        from sottovoce.daemon.backends.mlx_whisper_backend import MlxWhisperTranscriber

        return MlxWhisperTranscriber(path, **kwargs)

    @classmethod
    def make(cls, model: str, **kwargs: Any) -> Transcriber:
        return cls.at(real_models.mlx_copy(model), **kwargs)

    @staticmethod
    def spy(monkeypatch: pytest.MonkeyPatch, t: Any, fake: Any = None) -> Calls:
        """Record every ``mlx_whisper.transcribe`` call (run it, or return ``fake``)."""
        import mlx_whisper

        calls = Calls()
        real = mlx_whisper.transcribe

        def transcribe(audio: Any, **kwargs: Any) -> Any:
            calls.kwargs.append(kwargs)
            return fake if fake is not None else real(audio, **kwargs)

        monkeypatch.setattr(mlx_whisper, "transcribe", transcribe)
        return calls

    @staticmethod
    def output(*segments: str) -> Any:
        """What ``mlx_whisper.transcribe`` returns for these segment texts."""
        return {"text": "".join(segments), "segments": [{"text": s} for s in segments], "language": "en"}

    @staticmethod
    def decoding(kwargs: dict[str, Any]) -> DecodingSettings:
        return DecodingSettings(
            tuple(kwargs["temperature"]),
            kwargs["logprob_threshold"],
            kwargs["no_speech_threshold"],
            kwargs["compression_ratio_threshold"],
        )

    @staticmethod
    def engine_specific(t: Any, kwargs: dict[str, Any]) -> None:
        assert kwargs["verbose"] is None  # False would draw a tqdm bar
        assert kwargs["fp16"] is bool(t.fp16)
        assert kwargs["path_or_hf_repo"] == str(t.path)

    @staticmethod
    def count_passes(monkeypatch: pytest.MonkeyPatch, t: Any) -> tuple[list[int], list[int]]:
        """Count calls of the real audio encoder (under the backend's reusing wrapper) and of decoding passes (one
        per temperature tried)."""
        from mlx_whisper.whisper import AudioEncoder, Whisper

        encodes: list[int] = []
        decodes: list[int] = []
        real_encode, real_decode = AudioEncoder.__call__, Whisper.decode

        def encode(self: Any, x: Any) -> Any:
            encodes.append(1)
            return real_encode(self, x)

        def decode(self: Any, *args: Any, **kwargs: Any) -> Any:
            decodes.append(1)
            return real_decode(self, *args, **kwargs)

        monkeypatch.setattr(AudioEncoder, "__call__", encode)
        monkeypatch.setattr(Whisper, "decode", decode)
        return encodes, decodes


class FasterWhisperEngine:
    name = "faster-whisper"

    @staticmethod
    def at(path: Path, **kwargs: Any) -> Transcriber:
        from sottovoce.daemon.backends.faster_whisper_backend import FasterWhisperTranscriber

        return FasterWhisperTranscriber(path, **kwargs)

    @classmethod
    def make(cls, model: str, **kwargs: Any) -> Transcriber:
        return cls.at(real_models.store_path(model), **kwargs)

    @staticmethod
    def spy(monkeypatch: pytest.MonkeyPatch, t: Any, fake: Any = None) -> Calls:
        """Record every call of the loaded ``WhisperModel``'s ``transcribe`` (run it, or return ``fake``)."""
        calls = Calls()
        real = t._model.transcribe

        def transcribe(audio: Any, **kwargs: Any) -> Any:
            calls.kwargs.append(kwargs)
            return fake if fake is not None else real(audio, **kwargs)

        monkeypatch.setattr(t._model, "transcribe", transcribe)
        return calls

    @staticmethod
    def output(*segments: str) -> Any:
        """What ``WhisperModel.transcribe`` returns: (segments, info); only the kept windows' segments."""
        return [types.SimpleNamespace(text=s) for s in segments], types.SimpleNamespace(language="en")

    @staticmethod
    def decoding(kwargs: dict[str, Any]) -> DecodingSettings:
        return DecodingSettings(
            tuple(kwargs["temperature"]),
            kwargs["log_prob_threshold"],
            kwargs["no_speech_threshold"],
            kwargs["compression_ratio_threshold"],
        )

    @staticmethod
    def engine_specific(t: Any, kwargs: dict[str, Any]) -> None:
        # The seed's greedy decoding, not faster-whisper's defaults (beam 5, best of 5), and no second VAD.
        assert (kwargs["beam_size"], kwargs["best_of"], kwargs["vad_filter"]) == (1, 1, False)

    @staticmethod
    def count_passes(monkeypatch: pytest.MonkeyPatch, t: Any) -> tuple[list[int], list[int]]:
        """Count calls that reach the real encoder (``WhisperModel.encode``, the reusing subclass's ``super()``), and
        CTranslate2 ``generate`` calls (one per temperature tried)."""
        import faster_whisper

        encodes: list[int] = []
        decodes: list[int] = []
        real_encode = faster_whisper.WhisperModel.encode

        def encode(self: Any, features: Any) -> Any:
            encodes.append(1)
            return real_encode(self, features)

        class CountingModel:
            def __init__(self, inner: Any) -> None:
                self._inner = inner

            def __getattr__(self, name: str) -> Any:
                return getattr(self._inner, name)

            def generate(self, *args: Any, **kwargs: Any) -> Any:
                decodes.append(1)
                return self._inner.generate(*args, **kwargs)

        monkeypatch.setattr(faster_whisper.WhisperModel, "encode", encode)
        monkeypatch.setattr(t._model, "model", CountingModel(t._model.model))
        return encodes, decodes


ENGINES: dict[str, Any] = {"mlx": MlxEngine, "faster-whisper": FasterWhisperEngine}
_MODULES = {"mlx": "mlx_whisper", "faster-whisper": "faster_whisper"}


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request: pytest.FixtureRequest) -> Any:
    pytest.importorskip(_MODULES[request.param])
    return ENGINES[request.param]


@pytest.fixture(scope="module")
def loaded(engine: Any) -> Iterator[Callable[..., Any]]:
    """Loaded transcribers of this engine, one per (model, allowed languages), shared by the module's tests."""
    made: dict[tuple[str, tuple[str, ...]], Any] = {}

    def get(model: str, allowed: tuple[str, ...] = ()) -> Any:
        if (model, allowed) not in made:
            t = engine.make(model, allowed_languages=allowed)
            t.load()
            made[model, allowed] = t
        return made[model, allowed]

    yield get
    for t in made.values():
        t.unload()


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    return say(QUESTION)


# ----------------------------------------------------------------------------------------------------- speech


def test_speech_is_transcribed(engine: Any, loaded: Callable[..., Any], question: np.ndarray) -> None:
    t = loaded(TINY)
    assert t.engine == engine.name

    result = t.transcribe(question)

    assert {"capital", "france"} <= set(words(result.text)), result
    assert (result.language, result.no_speech) == ("en", False) and result.segments >= 1


@pytest.mark.parametrize(
    "pcm",
    [np.zeros(2 * SR, np.float32), noise(2.0, -70), noise(0.0, -20)],
    ids=["digital-silence", "noise-70dBFS", "empty"],
)
def test_silence_never_reaches_whisper(
    engine: Any, loaded: Callable[..., Any], question: np.ndarray, monkeypatch: pytest.MonkeyPatch, pcm: np.ndarray
) -> None:
    tiny, base = loaded(TINY), loaded(BASE)
    tiny_calls, base_calls = engine.spy(monkeypatch, tiny), engine.spy(monkeypatch, base)

    assert tiny.transcribe(pcm) == TranscriptResult("", "en", True, 0)  # English-only: the language is known
    assert base.transcribe(pcm) == TranscriptResult("", None, True, 0)  # nothing ran to detect one
    assert base.transcribe(pcm, language="de") == TranscriptResult("", "de", True, 0)

    assert tiny_calls.kwargs == [] and base_calls.kwargs == []
    # The same spy sees the call for speech.
    assert tiny.transcribe(question).no_speech is False
    assert len(tiny_calls.kwargs) == 1


def test_seed_decoding_settings_reach_the_engine(
    engine: Any, loaded: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = loaded(TINY)
    calls = engine.spy(monkeypatch, t, fake=engine.output(" Hello."))

    assert t.transcribe(noise(1.0, -20)) == TranscriptResult("Hello.", "en", False, 1)

    (kwargs,) = calls.kwargs
    assert (
        engine.decoding(kwargs)
        == DecodingSettings()
        == DecodingSettings((0.0, 0.2, 0.4, 0.6, 0.8, 1.0), -1.0, 0.6, 2.4)
    )
    assert kwargs["initial_prompt"] is None
    engine.engine_specific(t, kwargs)


def test_other_decoding_settings_are_passed_as_given(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = DecodingSettings(temperatures=(0.0, 0.4), logprob_threshold=-0.5, no_speech_threshold=0.3)
    t = engine.make(TINY, decoding=settings)
    t.load()
    calls = engine.spy(monkeypatch, t, fake=engine.output(" Hello."))

    assert t.transcribe(noise(1.0, -20)).text == "Hello."

    (kwargs,) = calls.kwargs
    assert engine.decoding(kwargs) == settings
    engine.engine_specific(t, kwargs)


def test_prompt_is_whispers_initial_prompt(
    engine: Any, loaded: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = loaded(TINY)
    calls = engine.spy(monkeypatch, t, fake=engine.output(" and then Paris."))

    result = t.transcribe(noise(1.0, -20), prompt="We flew from Sottovoce airport")

    assert result == TranscriptResult("and then Paris.", "en", False, 1)  # the prompt is context, not output
    (kwargs,) = calls.kwargs
    assert kwargs["initial_prompt"] == "We flew from Sottovoce airport"
    # Silence is still stopped before Whisper, prompt or not.
    assert t.transcribe(np.zeros(SR, np.float32), prompt="context").no_speech
    assert len(calls.kwargs) == 1


@pytest.mark.parametrize("prompt", [None, "", "   "], ids=["none", "empty", "blank"])
def test_no_prompt_passes_none(
    engine: Any,
    loaded: Callable[..., Any],
    question: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    prompt: str | None,
) -> None:
    t = loaded(TINY)
    before = t.transcribe(question)
    calls = engine.spy(monkeypatch, t)

    assert t.transcribe(question, prompt=prompt) == before
    (kwargs,) = calls.kwargs
    assert kwargs["initial_prompt"] is None  # "" or blanks would be decoded as a lone space


@pytest.mark.parametrize(
    "segments",
    [(), (" ...",), (" ♪",), ("", "  ")],
    ids=["every-window-skipped", "dots", "music", "blank-segments"],
)
def test_whisper_output_without_words_is_no_speech(
    engine: Any, loaded: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, segments: tuple[str, ...]
) -> None:
    t = loaded(TINY)
    calls = engine.spy(monkeypatch, t, fake=engine.output(*segments))
    assert t.transcribe(noise(1.0, -20)) == TranscriptResult("", "en", True, 0)
    assert len(calls.kwargs) == 1  # Whisper ran: it is its output that says nothing


# -------------------------------------------------------------------------------------------------- languages


@pytest.mark.slow
def test_allowed_languages_on_the_multilingual_model(engine: Any, loaded: Callable[..., Any]) -> None:
    german = say(GERMAN, voice="de")

    allowed = loaded(BASE, ("en", "de")).transcribe(german)
    assert allowed.language == "de" and not allowed.no_speech, allowed
    assert {"guten", "tag"} <= set(words(allowed.text)), allowed.text  # transcribed in German, not translated

    refused = loaded(BASE, ("en", "fr")).transcribe(german)
    assert refused.language in ("en", "fr"), refused


def test_english_only_model_ignores_allowed_languages(engine: Any, question: np.ndarray) -> None:
    t = engine.make(TINY, allowed_languages=("de", "fr"))
    t.load()
    result = t.transcribe(question)
    assert result.language == "en" and "france" in words(result.text), result
    assert t.transcribe(np.zeros(SR, np.float32)).language == "en"


@pytest.mark.slow
def test_language_detection_costs_one_encoder_pass(
    engine: Any, loaded: Callable[..., Any], question: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = loaded(BASE)
    encodes, decodes = engine.count_passes(monkeypatch, t)

    result = t.transcribe(question)  # no language given: detection runs, on the window decoding then uses

    # base hears "capital and friends" on this espeak clip (both engines): the text is not what is tested here.
    assert result.language == "en" and "capital" in words(result.text), result
    assert len(encodes) == 1, "detection and decoding must share one encoder pass"
    assert len(decodes) == 1  # confident greedy decoding: no fallback

    # A log-prob threshold no decoding can meet forces the fallback to the next temperature: still one pass.
    monkeypatch.setattr(t, "decoding", DecodingSettings(temperatures=(0.0, 0.2), logprob_threshold=1.0))
    encodes.clear()
    decodes.clear()
    t.transcribe(question)
    assert len(decodes) == 2, "the fallback temperature did not run"
    assert len(encodes) == 1


# ------------------------------------------------------------------------------------------ loading, unloading


def test_unload_then_transcribe_is_an_error_and_load_again_works(engine: Any, question: np.ndarray) -> None:
    t = engine.make(TINY)
    with pytest.raises(RuntimeError, match="before load"):
        t.transcribe(question)
    t.load()
    first = t.transcribe(question)

    t.unload()
    t.unload()  # twice is harmless

    with pytest.raises(RuntimeError, match="before load"):
        t.transcribe(question)
    t.load()
    assert t.transcribe(question) == first


def test_missing_model_folder_is_a_one_line_load_error(engine: Any, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as excinfo:
        engine.at(missing).load()
    message = str(excinfo.value)
    assert "\n" not in message and str(missing) in message and len(message) < 400, message
