"""The segmenter's scheduling (issue 11): the real Segmenter and voice activity detector, a fake clock, no thread.

Audio is listened to in the order it is due in real time across clients, a client far ahead of real time is not
listened to at all, and a client that goes is forgotten with its queued audio.
"""

from __future__ import annotations

import numpy as np

from sottovoce.daemon.segmenter import SLICE_SAMPLES, Segmenter
from sottovoce.daemon.worker import AskJob

RATE = 16_000


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def noise(seconds: float) -> np.ndarray:
    return (0.01 * np.random.default_rng(0).standard_normal(int(seconds * RATE))).astype(np.float32)


def make(lead: float = 10.0) -> tuple[Segmenter, Clock, list[object], list[bytes]]:
    clock, submitted, heard = Clock(), [], []
    seg = Segmenter(submitted.append, lead_seconds=lead, clock=clock)
    original = seg._on_audio

    def spy(key, lane, utterance, pcm):  # type: ignore[no-untyped-def]
        heard.append(key)
        original(key, lane, utterance, pcm)

    seg._on_audio = spy  # type: ignore[method-assign]
    return seg, clock, submitted, heard


def ask(key: bytes, utterance: int = 0) -> AskJob:
    return AskJob(key, "a", None, np.zeros(1, np.float32), 8, 0.0, None, True, "", utterance=utterance)


def test_live_audio_is_listened_to_before_audio_that_arrived_early() -> None:
    seg, clock, _, heard = make()
    seg.audio(b"dump", 0, noise(8.0))  # 8 s at once: due over the next 8 s
    clock.now += 0.9
    seg.audio(b"live", 0, noise(0.256))  # a person's chunk, due now
    assert seg.run_pending() == 16 + 1
    # Only what was due before the live chunk (the dump's first 0.9 s: two slices) comes first.
    assert heard.index(b"live") == 2, heard
    assert heard.count(b"dump") == 8.0 * RATE / SLICE_SAMPLES


def test_audio_far_ahead_of_real_time_is_listened_to_only_at_its_ask_and_last() -> None:
    seg, clock, submitted, heard = make(lead=10.0)
    seg.audio(b"dump", 0, noise(5.0))  # within the lead: queued
    seg.audio(b"dump", 0, noise(30.0))  # 35 s ahead: the rest of this recording is not
    assert seg.pending_seconds() == 0.0  # even the first 5 s are dropped from the queue
    seg.audio(b"dump", 0, noise(30.0))
    assert seg.pending_seconds() == 0.0
    seg.run_pending()
    assert heard == []  # a dump nobody asks about costs nothing
    job = AskJob(b"dump", "a", None, noise(65.0), 8, 0.0, None, True, "", utterance=0)
    seg.ask(job)  # now its whole recording is listened to...
    assert seg.pending_seconds() == 65.0
    clock.now += 0.1
    seg.audio(b"live", 0, noise(0.256))
    seg.run_pending()
    # ...as if it had come in real time: only its first slice was due before the live chunk of another client.
    assert heard.index(b"live") == 1, heard
    assert heard.count(b"dump") == 65.0 * RATE / SLICE_SAMPLES
    assert submitted[-1] is job and job.incremental


def test_a_client_that_goes_is_forgotten_with_its_queued_audio() -> None:
    seg, _, submitted, heard = make()
    seg.audio(b"gone", 0, noise(4.0))
    seg.audio(b"stays", 0, noise(0.5))
    assert seg.pending_seconds() == 4.5
    seg.drop(b"gone")
    assert seg.pending_seconds() == 0.5
    seg.run_pending()
    assert heard == [b"stays"] and submitted == []


def test_a_reset_drops_queued_audio_but_keeps_the_clients_clock() -> None:
    seg, _, _, heard = make(lead=10.0)
    seg.audio(b"c", 0, noise(8.0))
    seg.reset(b"c")
    assert seg.pending_seconds() == 0.0
    seg.audio(b"c", 1, noise(4.0))  # 12 s ahead in all: resetting does not buy a fresh lead
    assert seg.pending_seconds() == 0.0
    seg.run_pending()
    assert heard == []
