"""The real daemon with the small real models (Whisper tiny.en and base, SmolLM2-135M-Instruct) on real speech, on
each engine family: faster-whisper + llama.cpp (the default on Linux) and MLX.

Uses the model store that `scripts/install.sh` fills (`.work/models`, or $SOTTOVOCE_MODELS_DIR); skipped with a
clear reason where it is empty. Speech is espeak-ng's, made at test time; nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
from daemon_proc import DaemonProcess  # type: ignore[import-not-found]
from real_models import ENGINE_FLAGS, STORE, needs_real_models  # type: ignore[import-not-found]
from speech import needs_espeak, say  # type: ignore[import-not-found]

from sottovoce.client import protocol as p

pytestmark = [pytest.mark.realmodels, pytest.mark.slow, pytest.mark.timeout(900), needs_espeak, needs_real_models]

# Eight fixed sentences, about 5 to 25 s each when espeak-ng speaks them.
SENTENCES = [
    "Please set a timer for twenty minutes while the bread is in the oven, and tell me when it is time to take it out.",
    "Remind me to call the dentist tomorrow morning, and then send an email to my sister about the weekend.",
    "I am looking for a good book about the history of science, something that explains how people learned "
    "about electricity and magnetism.",
    "Could you tell me how long it takes to walk from the train station to the museum? I have about an hour "
    "before my meeting starts, and I do not want to be late.",
    "My garden has tomatoes, beans and a few rows of potatoes. This summer was very dry, and I had to water "
    "everything twice a day. What vegetables grow well when there is not much rain?",
    "The weather is cold today, so I will wear a warm coat and take the bus instead of riding my bicycle to work.",
    "Last night we watched a film about a family that travels across the country in an old car. The children "
    "argue all the time, the car breaks down twice, and in the end they arrive at the sea just as the sun goes "
    "down. It was funny and a little sad at the same time.",
    "Write a short list of things I need for a picnic: bread, cheese, apples, water, and a blanket to sit on.",
]
QUESTION = "What is the capital of France?"


def normalise(text: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    import jiwer

    return float(jiwer.wer([normalise(r) for r in references], [normalise(h) for h in hypotheses]))


def daemon_for(tmp_path_factory: pytest.TempPathFactory, engines: str, whisper: str, *flags: str) -> DaemonProcess:
    work = tmp_path_factory.mktemp(f"real-{engines}-{whisper}")
    return DaemonProcess(
        work,
        whisper_model=whisper,
        llm_model="smollm2-135m-instruct",
        extra_args=["--max-tokens", "32", *ENGINE_FLAGS[engines], *flags],
        env={"SOTTOVOCE_MODELS_DIR": str(STORE)},
    )


@pytest.fixture(scope="module", params=list(ENGINE_FLAGS))
def engines(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def transcribe_all(daemon: DaemonProcess) -> list[p.Transcript]:
    """Each sentence streamed as tray-sized chunks, then asked; returns the transcripts."""
    transcripts = []
    with daemon.client(timeout=300) as client:
        for sentence in SENTENCES:
            pcm = np.concatenate([np.zeros(4000, np.float32), say(sentence), np.zeros(6400, np.float32)])
            client.reset()
            for start in range(0, pcm.size, p.CHUNK_SAMPLES):
                client.send_chunk(pcm[start : start + p.CHUNK_SAMPLES])
            events = list(client.stream(max_tokens=1))
            transcripts.append(next(e for e in events if isinstance(e, p.Transcript)))
    return transcripts


def test_sentences_are_long_enough() -> None:
    lengths = [say(s).size / p.SAMPLE_RATE for s in SENTENCES]
    assert len(SENTENCES) >= 8
    assert all(5.0 <= n <= 25.0 for n in lengths), lengths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, engines: str):
    with daemon_for(tmp_path_factory, engines, "whisper-tiny.en") as daemon:
        yield daemon


def test_each_engine_runs_both_stages(tiny: DaemonProcess, engines: str) -> None:
    with tiny.client(timeout=30) as client:
        models = client.status().models
    expected = {"fast": ("faster-whisper", "llama.cpp"), "mlx": ("mlx", "mlx")}[engines]
    assert (models["whisper"]["engine"], models["llm"]["engine"]) == expected
    assert models["whisper"]["engine_reason"] == "chosen in the settings"


def test_tiny_en_word_error_rate_under_20_percent(tiny: DaemonProcess) -> None:
    transcripts = transcribe_all(tiny)
    assert all(not t.no_speech for t in transcripts)
    wer = corpus_wer(SENTENCES, [t.text for t in transcripts])
    print(f"whisper tiny.en, incremental, {tiny.args[-1]}: WER {wer:.1%}")
    assert wer < 0.20


def test_incremental_is_as_good_as_whole_recording(tiny: DaemonProcess, tmp_path_factory, engines: str) -> None:
    incremental = corpus_wer(SENTENCES, [t.text for t in transcribe_all(tiny)])
    with daemon_for(tmp_path_factory, engines, "whisper-tiny.en", "--no-incremental") as whole_daemon:
        whole = corpus_wer(SENTENCES, [t.text for t in transcribe_all(whole_daemon)])
    print(f"whisper tiny.en WER: incremental {incremental:.1%}, whole recording {whole:.1%}")
    assert incremental <= whole + 0.03


@pytest.mark.parametrize(
    "audio",
    [
        np.zeros(30 * p.SAMPLE_RATE, np.float32),
        (0.003 * np.random.default_rng(7).standard_normal(30 * p.SAMPLE_RATE)).astype(np.float32),
    ],
    ids=["30s-silence", "30s-low-noise"],
)
def test_silence_and_low_noise_are_no_speech(tiny: DaemonProcess, audio: np.ndarray) -> None:
    with tiny.client(timeout=120) as client:
        answer = client.ask(audio=audio)
    assert answer.no_speech and answer.transcript == "" and answer.answer == "" and answer.tokens == 0


def test_spoken_question_gets_paris(tiny: DaemonProcess) -> None:
    heard: list[p.Message] = []
    with tiny.client(timeout=120) as client:
        answer = client.ask(audio=say(QUESTION), on_event=heard.append)
    assert "capital of france" in normalise(answer.transcript or "")
    assert "paris" in answer.answer.lower()
    assert any(isinstance(e, p.AnswerChunk) for e in heard)  # streamed


def test_typed_follow_up_uses_the_conversation_and_its_cache(tiny: DaemonProcess) -> None:
    with tiny.client(timeout=120) as client:
        client.reset()
        first = client.ask(QUESTION, max_tokens=16)
        follow_up = client.ask("Is it a big city?", max_tokens=16)
    assert "paris" in first.answer.lower()
    assert follow_up.prompt_tokens > first.prompt_tokens + first.tokens  # the first turn is in its prompt
    assert follow_up.cached_tokens >= first.prompt_tokens  # ...and was not computed again


def test_base_word_error_rate_under_10_percent(tmp_path_factory: pytest.TempPathFactory, engines: str) -> None:
    with daemon_for(tmp_path_factory, engines, "whisper-base") as daemon:
        transcripts = transcribe_all(daemon)
    wer = corpus_wer(SENTENCES, [t.text for t in transcripts])
    print(f"whisper base, incremental: WER {wer:.1%}")
    assert {t.language for t in transcripts} == {"en"}
    assert wer < 0.10
