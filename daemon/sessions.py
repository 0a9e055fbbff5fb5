"""Per-client sessions: each ZeroMQ identity has its own bounded audio buffer and at most one running ask.

Used only on the IO thread, so nothing here locks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import numpy as np
import soxr
from sottovoce.client.protocol import SAMPLE_RATE, ErrorCode, ProtocolError


@dataclasses.dataclass
class Session:
    identity: bytes
    max_samples: int
    last_seen: float = dataclasses.field(default_factory=time.monotonic)
    client_name: str | None = None
    active_ask: str | None = None
    """Id of this client's queued or running ask, cleared when its last reply is sent."""
    utterance: int = 0
    """Counts recordings: a new one starts after each voice ask and each reset."""
    _blocks: list[np.ndarray] = dataclasses.field(default_factory=list)
    _samples: int = 0
    _resampler: soxr.ResampleStream | None = None
    _resampler_rate: int = SAMPLE_RATE

    @property
    def buffered_samples(self) -> int:
        return self._samples

    @property
    def buffered_seconds(self) -> float:
        return self._samples / SAMPLE_RATE

    def append(self, pcm: np.ndarray, rate: int, ref: str | None = None) -> np.ndarray:
        """Add a chunk (resampled to 16 kHz); refuse it whole if the buffer would pass its cap.

        Returns the 16 kHz audio added (a resampler holds a few samples back until `flush`)."""
        # Check the cap before touching the resampler, so a refused chunk changes nothing.
        expected = int(np.ceil(pcm.size * SAMPLE_RATE / rate))
        if self._samples + expected > self.max_samples:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"audio buffer is full ({self.max_samples / SAMPLE_RATE:.0f} s cap, "
                f"{self.buffered_seconds:.1f} s buffered); chunk refused, buffered audio kept — send `ask` or `reset`",
                ref,
            )
        added = []
        if rate != SAMPLE_RATE:
            pcm = self._resample(pcm, rate)
        elif self._resampler is not None:
            added.append(self.flush())
        if pcm.size:
            block = np.array(pcm, dtype=np.float32, copy=True)
            self._blocks.append(block)
            self._samples += block.size
            added.append(block)
        return np.concatenate(added) if len(added) > 1 else (added[0] if added else np.zeros(0, np.float32))

    def _resample(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        # A stream resampler keeps its filter state between chunks: resampling each chunk alone would click.
        if self._resampler is not None and self._resampler_rate != rate:
            self.flush()
        if self._resampler is None:
            self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            self._resampler_rate = rate
        return self._resampler.resample_chunk(np.ascontiguousarray(pcm, dtype=np.float32))

    def flush(self) -> np.ndarray:
        """Buffer what the resampler still holds (call before taking the audio); returns it."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True).astype(np.float32)
        self._resampler = None
        if tail.size:
            self._blocks.append(tail)
            self._samples += tail.size
        return tail

    def take_audio(self) -> np.ndarray:
        """Hand the buffered audio to an ask and start a fresh buffer."""
        self.flush()
        pcm = np.concatenate(self._blocks) if self._blocks else np.zeros(0, np.float32)
        self._blocks, self._samples = [], 0
        return pcm

    def put_back(self, pcm: np.ndarray) -> None:
        """Return audio that an ask refused (too little of it) to the front of the buffer: nothing is lost."""
        if pcm.size:
            self._blocks.insert(0, pcm)
            self._samples += pcm.size

    def clear(self) -> float:
        """Drop the buffered audio; returns how many seconds were dropped."""
        dropped = self.buffered_seconds
        self._blocks, self._samples, self._resampler = [], 0, None
        return dropped


class SessionTable:
    def __init__(self, *, buffer_seconds: float, max_sessions: int = 1024) -> None:
        self._sessions: dict[bytes, Session] = {}
        self._max_samples = int(buffer_seconds * SAMPLE_RATE)
        self._max_sessions = max_sessions

    def get(self, identity: bytes) -> Session:
        session = self._sessions.get(identity)
        if session is None:
            if len(self._sessions) >= self._max_sessions:
                self._evict_oldest_idle()
            session = Session(identity=identity, max_samples=self._max_samples)
            self._sessions[identity] = session
        session.last_seen = time.monotonic()
        return session

    def find(self, identity: bytes) -> Session | None:
        return self._sessions.get(identity)

    def drop(self, identity: bytes) -> Session | None:
        return self._sessions.pop(identity, None)

    def expire(self, idle_seconds: float, now: float | None = None) -> list[Session]:
        """Remove sessions idle for longer than ``idle_seconds`` that have no ask in flight."""
        now = time.monotonic() if now is None else now
        gone = [s for s in self._sessions.values() if s.active_ask is None and now - s.last_seen > idle_seconds]
        for session in gone:
            del self._sessions[session.identity]
        return gone

    def _evict_oldest_idle(self) -> None:
        idle = [s for s in self._sessions.values() if s.active_ask is None]
        if idle:
            del self._sessions[min(idle, key=lambda s: s.last_seen).identity]

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(self._sessions.values())
