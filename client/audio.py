"""Read audio files for voice asks: any rate and channel count soundfile reads (WAV, FLAC, OGG...) -> 16 kHz mono."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
import soxr

from .protocol import SAMPLE_RATE


class AudioFileError(ValueError):
    pass


def load_audio(path: str | Path, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``rate`` (soxr's high-quality resampler)."""
    if not Path(path).is_file():
        raise AudioFileError(f"no such audio file: {path}")
    try:
        data, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioFileError(f"cannot read audio from {path}: {exc}") from None
    if data.size == 0:
        raise AudioFileError(f"{path} holds no audio samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if file_rate != rate:
        mono = soxr.resample(mono, file_rate, rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)
