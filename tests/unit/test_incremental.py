"""Incremental transcription over a real socket: real speech (espeak-ng), real voice activity detection, fake
Whisper that reports which audio reached it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeChat, FakeTranscriber  # type: ignore[import-not-found]
from inproc import RawClient, RunningServer  # type: ignore[import-not-found]
from speech import needs_espeak, say, with_pauses  # type: ignore[import-not-found]

from sottovoce.client import protocol as p
from sottovoce.client.config import Settings

pytestmark = needs_espeak


@pytest.fixture
def setup(tmp_path: Path):
    endpoint = f"ipc://{tmp_path}/d.sock"
    transcriber, chat = FakeTranscriber(), FakeChat()
    with RunningServer(endpoint, Settings(endpoint=endpoint), transcriber, chat):
        client = RawClient(endpoint)
        yield client, transcriber, chat
        client.close()


def send_audio(client: RawClient, pcm: np.ndarray, rate: int = p.SAMPLE_RATE) -> None:
    for start in range(0, pcm.size, 4096):
        client.send(p.Chunk(pcm=np.ascontiguousarray(pcm[start : start + 4096]), rate=rate))


def test_finished_stretches_are_transcribed_before_the_ask(setup) -> None:
    client, transcriber, chat = setup
    first = with_pauses(0.3, "The quick brown fox jumps over the lazy dog.", 1.0)
    send_audio(client, first)
    early = client.recv(timeout=10)  # while the "person" is still talking: no ask sent yet
    assert isinstance(early, p.TranscriptChunk) and early.ref is None
    assert early.text.startswith("heard") and 0 <= early.start < early.end <= first.size / p.SAMPLE_RATE
    send_audio(client, with_pauses("Then it ran into the forest.", 0.1))
    ask_id = client.send(p.Ask())
    replies = client.until_done(timeout=10)
    transcript = next(r for r in replies if isinstance(r, p.Transcript))
    assert transcript.ref == ask_id
    # the final transcript is the early stretch plus the tail, in order
    assert transcript.text.startswith(early.text + " heard")
    assert len(transcriber.calls) == 2
    assert chat.prompts[-1][-1].content == transcript.text
    assert replies[-1].seconds["transcribe_early"] > 0


def test_whole_recording_equals_the_sum_of_its_stretches(setup) -> None:
    client, transcriber, _ = setup
    recording = with_pauses(0.2, "One two three.", 0.8, "Four five six.", 0.8, "Seven eight.", 0.3)
    send_audio(client, recording)
    client.send(p.Ask())
    done = client.until_done(timeout=15)[-1]
    assert isinstance(done, p.Done) and not done.no_speech
    assert len(transcriber.calls) == 3
    # no sample is transcribed twice, and only silence is left out
    assert sum(transcriber.calls) <= recording.size
    assert sum(transcriber.calls) > say("One two three.").size


@pytest.mark.parametrize(
    "audio",
    [
        np.zeros(3 * p.SAMPLE_RATE, np.float32),
        (0.3 * np.sin(2 * np.pi * 440 * np.arange(3 * p.SAMPLE_RATE) / p.SAMPLE_RATE)).astype(np.float32),
        (0.05 * np.random.default_rng(0).standard_normal(3 * p.SAMPLE_RATE)).astype(np.float32),
    ],
    ids=["silence", "tone", "noise"],
)
def test_no_speech_never_reaches_whisper_or_the_llm(setup, audio: np.ndarray) -> None:
    client, transcriber, chat = setup
    send_audio(client, audio)
    client.send(p.Ask())
    replies = client.until_done(timeout=10)
    assert isinstance(replies[0], p.Transcript) and replies[0].no_speech
    assert replies[-1].no_speech and replies[-1].answer == ""
    assert transcriber.calls == [] and chat.prompts == []


def test_reset_forgets_early_transcripts(setup) -> None:
    client, transcriber, _ = setup
    send_audio(client, with_pauses(0.2, "This sentence is abandoned.", 1.0))
    assert isinstance(client.recv(timeout=10), p.TranscriptChunk)
    client.send(p.Reset())
    assert isinstance(client.recv(), p.Ok)
    send_audio(client, with_pauses(0.2, "Only this one counts.", 0.2))
    client.send(p.Ask())
    transcript = next(r for r in client.until_done(timeout=10) if isinstance(r, p.Transcript))
    assert transcript.text.count("heard") == 1
    assert transcript.text == f"heard {transcriber.calls[-1]} samples" + transcript.text.split("samples")[1]


def test_resampled_chunks_are_tracked_at_16k(setup) -> None:
    client, transcriber, _ = setup
    send_audio(client, with_pauses(0.2, "Testing a different rate.", 0.2, rate=48_000), rate=48_000)
    client.send(p.Ask())
    done = client.until_done(timeout=10)[-1]
    assert not done.no_speech
    assert sum(transcriber.calls) <= int(done.seconds and 10 * p.SAMPLE_RATE)


def test_next_recording_starts_fresh_after_an_ask(setup) -> None:
    client, _, _ = setup
    for sentence in ("First question here.", "Second question here."):
        send_audio(client, with_pauses(0.2, sentence, 0.2))
        client.send(p.Ask())
        transcript = next(r for r in client.until_done(timeout=10) if isinstance(r, p.Transcript))
        assert transcript.text.count("heard") == 1
        time.sleep(0.05)


def test_a_short_pause_is_transcribed_tentatively_and_reused_at_the_ask(setup) -> None:
    client, transcriber, _ = setup
    send_audio(client, with_pauses(0.2, "Is the tail ready before I let go of the key?", 0.35))
    deadline = time.monotonic() + 10
    while not transcriber.calls and time.monotonic() < deadline:  # transcribed while the key is still down
        time.sleep(0.02)
    assert len(transcriber.calls) == 1
    client.send(p.Ask())
    transcript = next(r for r in client.until_done(timeout=10) if isinstance(r, p.Transcript))
    assert transcript.text.startswith("heard")
    assert len(transcriber.calls) == 1  # the ask reused the tentative transcript


def test_speech_after_a_tentative_cut_is_not_lost(setup) -> None:
    client, _transcriber, _ = setup
    send_audio(client, with_pauses(0.2, "First part,", 0.3))  # tentative cut here
    send_audio(client, with_pauses("and the second part.", 0.1))
    client.send(p.Ask())
    transcript = next(r for r in client.until_done(timeout=10) if isinstance(r, p.Transcript))
    # the final transcript covers all the speech, not just the tentative first part
    heard = int(transcript.text.split()[1])
    assert heard >= say("First part,").size + say("and the second part.").size - 2 * 16000 * 0.3
