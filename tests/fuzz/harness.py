"""The daemon's decode + dispatch path driven synchronously, with an oracle, for property tests and the fuzzer.

``DispatchHarness`` wraps a real ``daemon.server.Server`` and ``daemon.worker.ModelWorker`` (fake models from
``tests/fakes.py``) around a recording socket, all on one thread: no event loop, no timing, so every run is
deterministic and a failing input replays exactly. ``feed(identity, frames)`` is what the daemon's receive loop does
with one multipart message; ``run_worker()`` does what the model thread does with the queued asks.

After every step the oracle checks (``check_step``) that:
- no exception escaped ``Server.handle`` (the real loop would answer ``internal`` and log a traceback: still a bug);
- every reply is a well-formed frame list that ``protocol.decode`` reads back as a daemon-to-client message;
- a message that does not decode gets exactly one ``error`` with a stable code, and no error is ``internal``;
- replies go to the identity that caused them;
- every accepted ask ends with exactly one final reply (``done`` or ``error``) carrying its id, and nothing is left
  behind (no running job, no session stuck with an active ask);
- memory stays bounded: sessions <= the table's cap, buffered audio <= the per-client cap, queue <= its depth.

``steps_from_bytes`` turns arbitrary bytes into a list of steps (the atheris input format) and ``steps_to_bytes``
is its inverse (to write seed inputs).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import queue
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import zmq

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from sottovoce.client import protocol as p  # noqa: E402
from sottovoce.client.config import Settings  # noqa: E402
from sottovoce.daemon.backends.base import ChatMessage, GenerationStep, TranscriptResult  # noqa: E402
from sottovoce.daemon.server import Server  # noqa: E402
from sottovoce.daemon.worker import ModelWorker  # noqa: E402

DAEMON_TYPES = frozenset(p.REGISTRY) - p.CLIENT_TYPES
FINAL_TYPES = (p.Done, p.Error)
IDENTITIES = (b"\x00k\x8bEg", b"\x00k\x8bEh", b"\x00tray", b"\x00script")
MAX_SESSIONS = 3
"""Small on purpose: the fuzzer reaches the session table's eviction path."""
RESAMPLER_SLACK = 64
"""A stream resampler may emit a few samples more than the cap's estimate (it flushes its filter tail)."""


class OracleError(AssertionError):
    pass


def worker_factory(transcriber: Any, chat: Any, settings: Settings) -> Callable[[Any], ModelWorker]:
    """``Server``'s worker factory for fake models (passes ``queue_depth`` where this ModelWorker takes it)."""
    accepted = inspect.signature(ModelWorker).parameters
    kwargs = {"queue_depth": settings.queue_depth} if "queue_depth" in accepted else {}
    return lambda emit: ModelWorker(transcriber, chat, emit, **kwargs)


class EchoTranscriber:
    """Like tests/fakes.py's, without sleeps (the fuzzer runs it thousands of times a second): 'hears' the length
    and level of the audio, so a reply shows whose audio reached the model."""

    name = "fuzz-whisper"
    engine = "fake"
    engine_reason = "fuzzing"

    def load(self) -> None:
        pass

    def transcribe(self, pcm: Any, *, language: str | None = None, **_: Any) -> TranscriptResult:
        import numpy as np

        rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if pcm.size else 0.0
        if rms < 1e-4:
            return TranscriptResult("", language or "en", True)
        return TranscriptResult(f"heard {pcm.size} samples at {rms:.3f}", language or "en", False, 1)


class EchoChat:
    """Echoes the question word by word; stops between words when asked to."""

    name = "fuzz-llm"
    engine = "fake"
    engine_reason = "fuzzing"

    def load(self) -> None:
        pass

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        should_stop: Callable[[], bool],
        **_: Any,
    ) -> Any:
        words = f"you said: {messages[-1].content}".split()
        for n, word in enumerate(words[:max_tokens], start=1):
            if should_stop():
                yield GenerationStep("", 1, n - 1, "cancelled")
                return
            last = n == len(words) or n == max_tokens
            reason = None if not last else ("stop" if n == len(words) else "length")
            yield GenerationStep(("" if n == 1 else " ") + word, 1, n, reason, 0.0)


class RecordingSocket:
    """Stands in for the ROUTER: records what is sent; identities in ``gone`` answer EHOSTUNREACH."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.gone: set[bytes] = set()

    def send_multipart(self, frames: Sequence[bytes], flags: int = 0, **kwargs: Any) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        frames = [bytes(f) for f in frames]
        if frames[0] in self.gone:
            future.set_exception(zmq.ZMQError(zmq.EHOSTUNREACH))
        else:
            self.sent.append(frames)
            future.set_result(None)
        return future


class ImmediateLoop:
    """Stands in for the IO loop: what the model thread hands over runs at once, on the harness's one thread."""

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        callback(*args)

    call_soon = call_soon_threadsafe

    def __getattr__(self, name: str) -> Any:
        raise OracleError(f"the harness's fake loop has no {name}(); teach tests/fuzz/harness.py about it")


class _Idle(BaseException):
    """Raised by the drained queue to return from ModelWorker._run (BaseException: _run catches Exception)."""


class DrainQueue(queue.Queue):  # type: ignore[type-arg]
    """The worker's job queue, except that waiting on an empty queue returns control to the harness."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        try:
            return super().get(block=False)
        except queue.Empty:
            raise _Idle from None  # the real thread would wait (or run its keep-alive timers): hand back instead


@dataclasses.dataclass
class Step:
    identity: int
    frames: list[bytes]
    run_worker: bool = False
    vanish: bool = False
    """The client disconnects after this message (its later replies fail with EHOSTUNREACH)."""


class DispatchHarness:
    def __init__(
        self,
        *,
        queue_depth: int = 2,
        buffer_seconds: float = 3.0,
        max_chunk_seconds: float = 1.0,
    ) -> None:
        self.settings = Settings(
            endpoint="ipc:///nonexistent/fuzz.sock",
            queue_depth=queue_depth,
            buffer_seconds=buffer_seconds,
            max_chunk_seconds=max_chunk_seconds,
            max_tokens=8,
        )
        self.socket = RecordingSocket()
        self.transcriber = EchoTranscriber()
        self.chat = EchoChat()
        self.server = Server(self.settings, worker_factory(self.transcriber, self.chat, self.settings), version="fuzz")
        self.server.sessions._max_sessions = MAX_SESSIONS
        self.server._socket = self.socket  # type: ignore[assignment]
        self.server._loop = ImmediateLoop()  # type: ignore[assignment]
        self.server.worker._queue = DrainQueue()
        self.segmenter = getattr(self.server, "segmenter", None)
        """The voice-activity thread between the IO loop and the model thread (when the daemon has one)."""
        self.accepted: dict[tuple[bytes, str], int] = {}
        """(identity, ask id) -> final replies seen, for asks the daemon took (queued)."""
        self.replies: list[tuple[bytes, p.Message]] = []
        self.vanished: set[bytes] = set()
        self.seen: set[bytes] = set()

    # ---- driving ----
    def feed(self, identity: bytes, frames: list[bytes]) -> list[tuple[bytes, p.Message]]:
        """One multipart message from ``identity``; returns the replies it caused (decoded), after checking them."""
        self.socket.gone.discard(identity)  # it speaks again: it (re)connected
        self.seen.add(identity)
        start = len(self.socket.sent)
        try:
            self.server.handle([identity, *frames])
        except Exception as exc:
            raise OracleError(f"exception escaped Server.handle: {type(exc).__name__}: {exc}") from exc
        replies = self._decode_sent(start, from_worker=False)
        for who, _ in replies:
            if who != identity:
                raise OracleError(f"reply to a message from {identity!r} went to {who!r}")
        try:
            expected = p.decode(frames, allowed=p.CLIENT_TYPES)
        except p.ProtocolError as exc:
            if len(replies) != 1 or not isinstance(replies[0][1], p.Error):
                raise OracleError(
                    f"undecodable message ({exc.code}) got {len(replies)} replies, not one error"
                ) from None
            if replies[0][1].code != exc.code:
                raise OracleError(f"decode says {exc.code}, the daemon answered {replies[0][1].code}") from None
            return replies
        except Exception as exc:
            raise OracleError(f"protocol.decode raised {type(exc).__name__}: {exc}") from exc
        direct = [r for _, r in replies if getattr(r, "ref", None) is not None]
        if isinstance(expected, p.Cancel | p.Reset):
            # A queued ask that is cancelled ends at once, from the IO thread: that is its one final reply.
            for reply in [r for r in direct if isinstance(r, p.Error) and r.code == p.ErrorCode.CANCELLED]:
                key = (identity, reply.ref)
                if self.accepted.get(key) != 0:
                    raise OracleError(f"`cancelled` for {reply.ref!r}, which is not an open ask of {identity!r}")
                self.accepted[key] = 1
                direct.remove(reply)
        for reply in direct:
            if reply.ref != expected.id:  # type: ignore[attr-defined]
                raise OracleError(f"reply {reply.TYPE} has ref {reply.ref!r}, not {expected.id!r}")  # type: ignore[attr-defined]
        if isinstance(expected, p.Chunk | p.Ask | p.Cancel) and len(direct) > 1:
            raise OracleError(f"{expected.TYPE} got {len(direct)} immediate replies")
        if isinstance(expected, p.Hello | p.Status | p.Reset) and len(direct) != 1:
            raise OracleError(f"{expected.TYPE} got {len(direct)} replies, not one")
        if isinstance(expected, p.Ask):
            if not direct:  # queued: exactly one final reply must follow
                key = (identity, expected.id)
                if self.accepted.get(key) == 0 and identity not in self.vanished:
                    raise OracleError(f"ask id {expected.id!r} accepted twice while the first is open")
                self.accepted[key] = 0
            elif not isinstance(direct[0], p.Error):
                raise OracleError(f"an ask was answered at once with {direct[0].TYPE}")
        return replies

    def run_worker(self) -> list[tuple[bytes, p.Message]]:
        """What the model thread does with everything queued, run here until the queue is empty."""
        start = len(self.socket.sent)
        threads = [("segmenter", self.segmenter), ("model", self.server.worker)]
        for name, owner in threads:
            if owner is None:
                continue
            try:
                if owner is self.segmenter:
                    self.segmenter.run_pending()
                else:
                    owner._run()
            except _Idle:
                pass
            except Exception as exc:
                raise OracleError(f"the {name} thread raised {type(exc).__name__}: {exc}") from exc
        return self._decode_sent(start)

    def vanish(self, identity: bytes) -> None:
        self.socket.gone.add(identity)
        self.vanished.add(identity)

    def run(self, steps: Iterable[Step]) -> None:
        for step in steps:
            identity = IDENTITIES[step.identity % len(IDENTITIES)]
            self.feed(identity, step.frames)
            if step.vanish:
                self.vanish(identity)
            if step.run_worker:
                self.run_worker()
            self.check_bounds()
        self.run_worker()
        self.check_finished()

    # ---- the oracle ----
    def _decode_sent(self, start: int, *, from_worker: bool = True) -> list[tuple[bytes, p.Message]]:
        """Decode and check replies sent since ``start``. Only the model thread's replies count towards an ask's
        final reply: an immediate error that reuses an open ask's id (a client may reuse ids) answers the new
        message, not the queued ask."""
        out = []
        for frames in self.socket.sent[start:]:
            if len(frames) < 3:
                raise OracleError(f"reply of {len(frames)} frames")
            identity, body = frames[0], frames[1:]
            try:
                msg = p.decode(body)
            except p.ProtocolError as exc:
                raise OracleError(f"the daemon sent a reply that does not decode: {exc.text}: {body!r:.300}") from exc
            if msg.TYPE not in DAEMON_TYPES:
                raise OracleError(f"the daemon sent a {msg.TYPE!r}")
            if isinstance(msg, p.Error) and (msg.code not in p.ErrorCode.ALL or msg.code == p.ErrorCode.INTERNAL):
                raise OracleError(f"error code {msg.code!r}: {msg.text}")
            ref = getattr(msg, "ref", None)
            key = (identity, ref)
            if from_worker and key in self.accepted:
                if self.accepted[key] >= 1:
                    raise OracleError(f"ask {ref!r} got a {msg.TYPE} after its final reply")
                if isinstance(msg, FINAL_TYPES):
                    self.accepted[key] += 1
            elif (
                from_worker and isinstance(ref, str) and msg.TYPE != "error" and any(r == ref for _, r in self.accepted)
            ):
                raise OracleError(f"{msg.TYPE} for ask {ref!r} went to {identity!r}, which did not send it")
            out.append((identity, msg))
        self.replies.extend(out)
        return out

    def check_bounds(self) -> None:
        server = self.server
        # A client past the cap is refused (`overloaded`): the table never grows beyond it.
        cap = MAX_SESSIONS
        if len(server.sessions) > cap:
            raise OracleError(f"{len(server.sessions)} sessions, cap {cap}")
        for session in server.sessions:
            if session.buffered_samples > session.max_samples + RESAMPLER_SLACK:
                raise OracleError(f"buffer {session.buffered_samples} samples, cap {session.max_samples}")

    def check_finished(self) -> None:
        """All asks served: each accepted one ended exactly once (unless its client vanished), and no client is left
        marked busy: a fresh text ask from every client that spoke is taken and answered."""
        for (identity, ask_id), finals in self.accepted.items():
            if finals != 1 and identity not in self.vanished:
                raise OracleError(f"ask {ask_id!r} of {identity!r} ended {finals} times")
        self.server.sessions._max_sessions = len(IDENTITIES)  # a refused newcomer is not a client left busy
        for identity in sorted(self.seen):
            probe = p.Ask(id=f"probe-{identity.hex()}", text="still there?")
            replies = self.feed(identity, p.encode(probe))
            if replies:
                raise OracleError(f"after everything was served, {identity!r} got {replies[0][1]!r}")
            self.run_worker()
            if self.accepted.get((identity, probe.id)) != 1:
                raise OracleError(f"the probe ask of {identity!r} was not answered")


# ---- the fuzzer's input format ---------------------------------------------------------------------------------
# A sequence of steps: [flags u8] [frame count u8] then per frame [length u16 LE] [bytes]. flags: bits 0-1 the
# identity, bit 2 run the worker after this step, bit 3 the client vanishes after it. Truncated input ends the list.

MAX_STEPS = 32
MAX_FRAMES = 5


def steps_from_bytes(data: bytes) -> list[Step]:
    steps: list[Step] = []
    pos = 0
    while pos + 2 <= len(data) and len(steps) < MAX_STEPS:
        flags, count = data[pos], data[pos + 1] % (MAX_FRAMES + 1)
        pos += 2
        frames = []
        for _ in range(count):
            if pos + 2 > len(data):
                break
            (length,) = struct.unpack_from("<H", data, pos)
            pos += 2
            frames.append(data[pos : pos + length])
            pos += length
        steps.append(Step(flags & 3, frames, bool(flags & 4), bool(flags & 8)))
    return steps


def steps_to_bytes(steps: Iterable[Step]) -> bytes:
    out = bytearray()
    for step in steps:
        out += bytes([step.identity & 3 | step.run_worker << 2 | step.vanish << 3, len(step.frames)])
        for frame in step.frames:
            out += struct.pack("<H", len(frame)) + frame
    return bytes(out)


def encode_message(msg: p.Message) -> list[bytes]:
    return p.encode(msg)


def seed_inputs() -> dict[str, bytes]:
    """A small corpus of valid and classic-invalid sessions, so the fuzzer starts deep in dispatch."""
    import numpy as np

    tone = (0.2 * np.sin(np.arange(12_000) / 16_000 * 2 * np.pi * 300)).astype(np.float32)
    chunk = p.encode(p.Chunk(id="c1", pcm=tone))
    seeds: dict[str, list[Step]] = {
        "hello-status": [Step(0, p.encode(p.Hello(id="h1"))), Step(0, p.encode(p.Status(id="s1")))],
        "text-ask": [Step(1, p.encode(p.Ask(id="a1", text="what time is it")), run_worker=True)],
        "voice-ask": [Step(2, chunk), Step(2, chunk), Step(2, p.encode(p.Ask(id="a2")), run_worker=True)],
        "voice-ask-44k": [
            Step(0, p.encode(p.Chunk(id="c2", pcm=tone[:4096], rate=44_100))),
            Step(0, p.encode(p.Chunk(id="c3", pcm=tone[:4096], rate=44_100))),
            Step(0, p.encode(p.Chunk(id="c4", pcm=tone[:8192], rate=16_000))),
            Step(0, p.encode(p.Ask(id="a3", stream=False)), run_worker=True),
        ],
        "cancel-reset": [
            Step(3, p.encode(p.Ask(id="a4", text="one two three"))),
            Step(3, p.encode(p.Cancel(id="x1"))),
            Step(3, p.encode(p.Reset(id="r1")), run_worker=True),
        ],
        "busy": [Step(i % 4, p.encode(p.Ask(id=f"b{i}", text="hi"))) for i in range(5)],
        "vanish": [Step(1, p.encode(p.Ask(id="v1", text="bye")), vanish=True, run_worker=True)],
        "not-enough": [Step(0, p.encode(p.Chunk(id="c5", pcm=tone[:1000]))), Step(0, p.encode(p.Ask(id="a5")))],
    }
    out = {name: steps_to_bytes(steps) for name, steps in seeds.items()}
    try:
        from bad_frames import BAD_FRAMES  # another test module's list of classic bad messages
    except ImportError:
        BAD_FRAMES = []
    for n, (frames, _code) in enumerate(BAD_FRAMES):
        if any(len(f) > 0xFFFF for f in frames):
            continue  # the input format caps a frame at 64 KiB
        out[f"bad-{n:02d}"] = steps_to_bytes([Step(n % 4, list(frames))])
    return out


def check_bytes(data: bytes, **harness_options: Any) -> DispatchHarness:
    """The fuzz target's body: arbitrary bytes -> steps -> a fresh harness -> the oracle."""
    harness = DispatchHarness(**harness_options)
    harness.run(steps_from_bytes(data))
    return harness
