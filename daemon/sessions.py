"""Per-client sessions: each connected client has its own bounded audio buffer and at most one running ask.

A session is found by the ZeroMQ routing id, but it belongs to one *connection* (the socket's file descriptor,
``ZMQ_SRCFD``) and, over CURVE, to one client key (the ZAP ``User-Id``): a message with the same routing id from
another connection or key never reaches it (see ``Server.handle``). Inside the daemon a session is named by its
``key``, unique for the daemon's lifetime, so that the model and segmenter threads, which keep conversations and
transcripts by that key, can never hand one client's state to a later client that reuses a routing id.

Used only on the IO thread, so nothing here locks.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator

import numpy as np
import soxr

from sottovoce.client.protocol import SAMPLE_RATE, ErrorCode, ProtocolError


@dataclasses.dataclass(frozen=True)
class Peer:
    """The connection a message came in on."""

    fd: int | None = None
    """The connection's socket (``ZMQ_SRCFD``); None where unknown (frames fed to ``Server.handle`` directly)."""
    user: str | None = None
    """ZAP ``User-Id``: the client's CURVE public key (Z85); None without CURVE."""


_serials = itertools.count(1)


def _new_key(identity: bytes) -> bytes:
    return b"%d:" % next(_serials) + identity


@dataclasses.dataclass
class Session:
    identity: bytes
    max_samples: int
    peer: Peer = Peer()
    key: bytes = b""
    """Unique for the daemon's lifetime: what the worker and segmenter know this session by."""
    last_seen: float = dataclasses.field(default_factory=time.monotonic)
    client_name: str | None = None
    active_ask: str | None = None
    """Id of this client's queued or running ask, cleared when its last reply is sent."""
    utterance: int = 0
    """Counts recordings: a new one starts after each voice ask and each reset."""
    clock: float = 0.0
    """Virtual time at which the audio received so far would have finished arriving, spoken in real time."""
    _blocks: list[np.ndarray] = dataclasses.field(default_factory=list)
    _samples: int = 0
    _resampler: soxr.ResampleStream | None = None
    _resampler_rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        if not self.key:
            self.key = _new_key(self.identity)

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
        self.check_cap(int(np.ceil(pcm.size * SAMPLE_RATE / rate)), ref)
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

    def check_cap(self, samples: int, ref: str | None = None) -> None:
        """Refuse (`too-large`) ``samples`` more at 16 kHz if the buffer would pass its cap."""
        if self._samples + samples > self.max_samples:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"audio buffer is full ({self.max_samples / SAMPLE_RATE:.0f} s cap, "
                f"{self.buffered_seconds:.1f} s buffered); chunk refused, buffered audio kept — send `ask` or `reset`",
                ref,
            )

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


class BulkBudget:
    """A token bucket, daemon-wide, for audio that arrives ahead of real time: it bounds what dumping recordings
    costs (copying, checking, buffering) however many clients do it, while live audio never draws from it."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate, self._burst, self._clock = rate, burst, clock
        self._tokens = burst
        self._last = clock()

    def take(self, seconds: float) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if seconds > self._tokens:
            return False
        self._tokens -= seconds
        return True


class SessionTable:
    """Sessions by routing id, bounded in number and in the audio they buffer together.

    ``max_sessions``: a new client past it is refused (`overloaded`): the clients already served keep their state.
    ``max_total_seconds``: all buffers together; a chunk that would pass it is refused (`overloaded`), except that
    each session may always hold ``max_total_seconds / max_sessions`` (its reserve), so one client filling the
    daemon never starves another. The memory bound is therefore twice ``max_total_seconds`` of audio.
    """

    def __init__(
        self, *, buffer_seconds: float, max_sessions: int = 1024, max_total_seconds: float | None = None
    ) -> None:
        self._sessions: dict[bytes, Session] = {}
        self._by_key: dict[bytes, Session] = {}
        self._max_samples = int(buffer_seconds * SAMPLE_RATE)
        self._max_sessions = max_sessions
        total = max_total_seconds if max_total_seconds is not None else buffer_seconds * max_sessions
        self._max_total = int(total * SAMPLE_RATE)

    def get(self, identity: bytes, peer: Peer = Peer(), ref: str | None = None) -> Session:
        """This client's session, made if it has none; `overloaded` when the table is full."""
        session = self._sessions.get(identity)
        if session is None:
            if len(self._sessions) >= self._max_sessions:
                raise ProtocolError(
                    ErrorCode.OVERLOADED,
                    f"the daemon serves {self._max_sessions} clients already (max_sessions); try again later",
                    ref,
                )
            session = Session(identity=identity, max_samples=self._max_samples, peer=peer)
            self._sessions[identity] = session
            self._by_key[session.key] = session
        session.last_seen = time.monotonic()
        return session

    def full(self) -> bool:
        return len(self._sessions) >= self._max_sessions

    def find(self, identity: bytes) -> Session | None:
        return self._sessions.get(identity)

    def by_key(self, key: bytes) -> Session | None:
        return self._by_key.get(key)

    def on_fd(self, fd: int) -> list[Session]:
        return [s for s in self._sessions.values() if s.peer.fd == fd]

    def drop(self, identity: bytes) -> Session | None:
        session = self._sessions.pop(identity, None)
        if session is not None:
            self._by_key.pop(session.key, None)
        return session

    def check_room(self, session: Session, samples: int, ref: str | None = None) -> None:
        """Refuse (`overloaded`) a chunk of ``samples`` that would push all buffers together past the cap."""
        reserve = self._max_total // self._max_sessions
        if session.buffered_samples + samples <= reserve:
            return
        total = self.buffered_samples()
        if total + samples > self._max_total:
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"the daemon holds {total / SAMPLE_RATE:.0f} s of audio from all clients (cap "
                f"{self._max_total / SAMPLE_RATE:.0f} s); chunk refused, buffered audio kept: ask, `reset` or wait",
                ref,
            )

    def buffered_samples(self) -> int:
        return sum(s.buffered_samples for s in self._sessions.values())

    def expire(self, idle_seconds: float, now: float | None = None) -> list[Session]:
        """Sessions idle for longer than ``idle_seconds`` that have no ask in flight (the caller drops them)."""
        now = time.monotonic() if now is None else now
        return [s for s in self._sessions.values() if s.active_ask is None and now - s.last_seen > idle_seconds]

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))
