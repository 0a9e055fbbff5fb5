"""Where recordings are cut (real Silero VAD on espeak-ng speech) and how repetition loops are cut."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from speech import needs_espeak, say, with_pauses  # type: ignore[import-not-found]

from sottovoce.daemon.textguard import cut_repetitions
from sottovoce.daemon.vad import SAMPLE_RATE, CutPolicy, UtteranceTracker


def feed_all(tracker: UtteranceTracker, pcm: np.ndarray, block: int = 4096):
    stretches = []
    for start in range(0, pcm.size, block):
        stretches += tracker.feed(pcm[start : start + block])
    return stretches


def trimmed(pcm: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(pcm) > 0.01)
    return pcm[loud[0] : loud[-1] + 1]


@needs_espeak
def test_pauses_cut_the_recording_between_sentences_never_inside_a_word() -> None:
    recording = with_pauses(0.3, "The first sentence is here.", 0.8, "And here is the second one.", 0.8)
    tracker = UtteranceTracker()
    final = [s for s in feed_all(tracker, recording) if s.speech and not s.tentative]
    assert len(final) == 2
    for stretch in final:
        around = recording[stretch.end - 160 : stretch.end + 160]
        assert np.sqrt(np.mean(around**2)) < 0.005, "cut inside speech"
    assert final[0].end <= final[1].start
    rest = tracker.finish()
    assert rest is None or not rest.speech


@needs_espeak
def test_speech_without_pauses_is_cut_before_whisper_s_30_s_window() -> None:
    words = trimmed(say("one two three four five six seven eight nine ten eleven twelve thirteen fourteen"))
    recording = np.concatenate([words] * 12)  # ~50 s with no real pause
    policy = CutPolicy(min_pause_seconds=5.0)  # pretend the short gaps between words are not pauses
    tracker = UtteranceTracker(policy)
    stretches = [s for s in feed_all(tracker, recording) if not s.tentative]
    tail = tracker.finish()
    if tail is not None:
        stretches.append(tail)
    assert len(stretches) >= 2
    assert all((s.end - s.start) / SAMPLE_RATE <= policy.max_stretch_seconds + 0.1 for s in stretches)
    assert stretches[0].start == 0 and stretches[-1].end == recording.size
    assert all(a.end == b.start for a, b in itertools.pairwise(stretches))


def test_silence_and_noise_have_no_speech() -> None:
    rng = np.random.default_rng(1)
    for audio in (
        np.zeros(3 * SAMPLE_RATE, np.float32),
        (0.02 * rng.standard_normal(3 * SAMPLE_RATE)).astype(np.float32),
    ):
        tracker = UtteranceTracker()
        assert not any(s.speech for s in feed_all(tracker, audio))
        assert not tracker.has_speech()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Thank you. Thank you. Thank you. Thank you. Thank you.", "Thank you. Thank you. Thank you."),
        ("no, no, no, I said yes", "no, no, no, I said yes"),
        ("the cat sat on the mat", "the cat sat on the mat"),
        ("a b c a b c a b c a b c a b c end", "a b c a b c a b c end"),
        ("so so so so so so so so", "so so so"),
        ("", ""),
    ],
)
def test_repetition_loops_are_cut(text: str, expected: str) -> None:
    assert cut_repetitions(text) == expected
