"""Real speech for tests: espeak-ng sentences as 16 kHz mono float32 (cached per process)."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed (scripts/install.sh adds it)")


@functools.lru_cache(maxsize=64)
def _say(text: str, rate: int, voice: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True, capture_output=True)
        pcm, file_rate = soundfile.read(wav, dtype="float32")
    if file_rate != rate:
        pcm = soxr.resample(pcm, file_rate, rate)
    pcm = pcm.astype(np.float32)
    pcm.setflags(write=False)
    return pcm


def say(text: str, rate: int = 16_000, voice: str = "en-us") -> np.ndarray:
    """espeak-ng's speech for ``text`` (read-only array)."""
    return _say(text, rate, voice)


def with_pauses(*parts: str | float, rate: int = 16_000) -> np.ndarray:
    """Sentences and pauses (floats, in seconds) joined into one recording."""
    pieces = [np.zeros(int(p * rate), np.float32) if isinstance(p, float | int) else say(p, rate) for p in parts]
    return np.concatenate(pieces)
