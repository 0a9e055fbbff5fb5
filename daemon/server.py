"""The IO side of the daemon: an asyncio loop that owns the ROUTER socket, decodes, dispatches and replies.

Every client message is handled to completion here, in arrival order, so a client's `ask` always sees the chunks it
sent before it. Anything a client gets wrong is answered with an `error` and the loop goes on.

Connections. A socket monitor reports each connection accepted and each one closed (by the client, by the kernel
when it died, or by the ZMTP heartbeat when it went silent). A closed connection's session is dropped at once: its
ask is cancelled, its audio and conversation forgotten; messages still queued from it are discarded unread. Each
message carries its connection (``ZMQ_SRCFD``) and CURVE key (``User-Id``); one that does not match the session
found under its routing id starts a fresh session (see ``sessions``). The monitor is read before every message, so
a connection's close is always seen before a later connection on the same file descriptor speaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import sys
import time
from typing import Any, cast

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from sottovoce.client import protocol as p
from sottovoce.client.config import Settings

from .segmenter import Segmenter
from .sessions import BulkBudget, Peer, Session, SessionTable
from .worker import AskJob, ForgetJob, ModelState, ModelWorker, WarmJob

log = logging.getLogger(__name__)

CAPABILITIES = [
    "text-ask",
    "voice-ask",
    "stream",
    "cancel",
    "reset",
    "resample",
    "transcript-chunk",
    "conversation",
    "warm",
]
EXPIRY_PERIOD = 5.0
TRIM_AFTER_SECONDS = 60.0
"""A session that held this much audio when it ended makes the daemon trim its heap."""
MONITOR_PERIOD = 0.25
"""How often the socket monitor is read while no message arrives (it is also read before every message)."""
MONITOR_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


class Server:
    def __init__(self, settings: Settings, worker_factory: Any, *, version: str) -> None:
        """``worker_factory(emit) -> ModelWorker``: the worker needs the thread-safe emit this server provides."""
        self.settings = settings
        self.version = version
        self.sessions = SessionTable(
            buffer_seconds=settings.buffer_seconds,
            max_sessions=settings.max_sessions,
            max_total_seconds=settings.max_buffered_seconds,
        )
        self._max_chunk_samples = int(settings.max_chunk_seconds * p.SAMPLE_RATE)
        self._bulk = BulkBudget(settings.bulk_audio_rate, burst=settings.max_buffered_seconds)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._closed_fds: set[int] = set()
        """Connections closed and not accepted again: what is still queued from them is discarded."""
        self._jobs: dict[bytes, AskJob] = {}
        """Asks in flight, by session key (kept until their final reply, even after the session is gone)."""
        self._trim_due = False
        """Much audio was freed: hand the memory back to the system (see trim_heap)."""
        self._stopping: asyncio.Event | None = None
        self._started = time.monotonic()
        self.worker: ModelWorker = worker_factory(self._emit_threadsafe)
        self.segmenter = (
            Segmenter(self.worker.submit, idle=self.worker.idle, lead_seconds=settings.vad_lead_seconds)
            if settings.incremental
            else None
        )

    # ---- lifecycle ----
    async def serve(self, socket: zmq.asyncio.Socket) -> None:
        """Serve until ``stop()``; the caller made and bound the socket (see daemon.main)."""
        self._loop = asyncio.get_running_loop()
        self._socket = socket
        self._stopping = asyncio.Event()
        self._monitor = cast("zmq.asyncio.Socket", socket.get_monitor_socket(MONITOR_EVENTS))
        # A client that reconnects with a routing id of its own choosing before libzmq has let go of its old
        # connection would otherwise be ignored for good (libzmq serves only the first holder of an id): the newest
        # connection takes the id over; its session starts fresh (see handle).
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.worker.start()
        if self.segmenter is not None:
            self.segmenter.start()
        tasks = [
            asyncio.create_task(self._expire_sessions()),
            asyncio.create_task(self._receive_forever()),
            asyncio.create_task(self._watch_connections()),
        ]
        await self._stopping.wait()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for key, job in list(self._jobs.items()):
            job.cancel_code = p.ErrorCode.SHUTTING_DOWN
            if job.withdraw():
                self._deliver(key, _shutting_down(job.ask_id), True)
            else:
                job.cancelled.set()  # the model thread ends it with `shutting-down`
        if self.segmenter is not None:
            await asyncio.to_thread(self.segmenter.stop)
        await asyncio.to_thread(self.worker.stop)
        socket.disable_monitor()
        self._monitor.close(linger=0)

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def _receive_forever(self) -> None:
        sock = self._socket
        assert sock is not None
        while True:
            parts = await sock.recv_multipart(copy=False)
            try:
                self._read_monitor()  # first: a closed connection is known before its fd can speak again
                self._receive(parts)
            except Exception:  # a bug here must not stop the daemon from reading its socket
                log.exception("internal error receiving a message")

    async def _watch_connections(self) -> None:
        """Read the monitor when no message comes, so that a gone client's state is released promptly. (Only ever
        read synchronously on this loop, in order: a second reader could see a reused fd's events out of order.)"""
        while True:
            await asyncio.sleep(MONITOR_PERIOD)
            try:
                self._read_monitor()
            except Exception:
                log.exception("internal error reading the socket monitor")
            if self._trim_due:
                self._trim_due = False
                await asyncio.to_thread(trim_heap)

    def _receive(self, parts: list[zmq.Frame]) -> None:
        frames = [part.bytes for part in parts]
        peer = _peer_of(parts[-1])
        if peer.fd is not None and peer.fd in self._closed_fds:
            log.debug("discarded a message from %s: its connection has closed", frames[0].hex())
            return
        try:
            self.handle(frames, peer)
        except Exception:  # never let one message take the daemon down
            log.exception("internal error handling a message")
            if frames:
                self._send(frames[0], p.Error(code=p.ErrorCode.INTERNAL, text="internal error; see daemon log"))

    def _read_monitor(self) -> None:
        monitor = self._monitor
        assert monitor is not None
        while cast(int, monitor.get(zmq.EVENTS)) & zmq.POLLIN:
            try:
                # With NOBLOCK, pyzmq's asyncio socket reads at once and returns a finished future.
                future = cast("asyncio.Future[list[bytes]]", monitor.recv_multipart(flags=zmq.NOBLOCK))
                event = parse_monitor_message(future.result())
            except zmq.Again:
                return
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._closed_fds.discard(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._closed_fds.add(fd)
                for session in self.sessions.on_fd(fd):
                    log.info("client %s disconnected", _label(session))
                    self._end_session(session)

    async def _expire_sessions(self) -> None:
        while True:
            await asyncio.sleep(min(EXPIRY_PERIOD, self.settings.session_idle_seconds))
            for session in self.sessions.expire(self.settings.session_idle_seconds):
                self._end_session(session)
                log.info(
                    "session %s expired after %.0f s idle",
                    _label(session),
                    self.settings.session_idle_seconds,
                )

    # ---- dispatch ----
    def handle(self, frames: list[bytes], peer: Peer = Peer()) -> None:  # noqa: B008
        identity, body = frames[0], frames[1:]
        try:
            msg = p.decode(body, allowed=p.CLIENT_TYPES)
        except p.ProtocolError as exc:
            log.warning("bad message from %s: %s", identity.hex(), exc.text)
            self._send(identity, p.error_reply(exc))
            return
        session = self.sessions.find(identity)
        if session is not None and session.peer != peer:
            # The routing id is another connection's or another key's now. libzmq never delivers a duplicate of a
            # live id, so the old connection is gone: its state must not reach the new one.
            log.info("client %s reconnected or was replaced: its session starts afresh", _label(session))
            self._end_session(session)
            session = None
        try:
            if session is None and msg.TYPE in SESSIONLESS:
                getattr(self, "_on_" + msg.TYPE)(session, identity, msg)
                return
            if session is None:
                session = self.sessions.get(identity, peer, ref=msg.id)
            else:
                session.last_seen = time.monotonic()
            getattr(self, "_on_" + msg.TYPE)(session, identity, msg)
        except p.ProtocolError as exc:
            self._send(identity, p.error_reply(exc))

    def _on_hello(self, session: Session | None, identity: bytes, msg: p.Hello) -> None:
        if session is not None:
            session.client_name = msg.client
        major = msg.protocol.split(".", 1)[0]
        if major != str(p.PROTOCOL_MAJOR):
            raise p.ProtocolError(
                p.ErrorCode.VERSION,
                f"client speaks protocol {msg.protocol}; this daemon speaks {p.PROTOCOL_VERSION}",
                msg.id,
            )
        self._send(
            identity,
            p.Info(
                ref=msg.id,
                version=self.version,
                models={"whisper": self.worker.whisper.name, "llm": self.worker.llm.name},
                capabilities=CAPABILITIES,
                limits={
                    "sample_rate": p.SAMPLE_RATE,
                    "min_ask_samples": p.MIN_ASK_SAMPLES,
                    "max_chunk_samples": self._max_chunk_samples,
                    "buffer_seconds": self.settings.buffer_seconds,
                    "queue_depth": self.settings.queue_depth,
                    "max_message_bytes": self.settings.max_message_bytes,
                    "max_sessions": self.settings.max_sessions,
                    "max_buffered_seconds": self.settings.max_buffered_seconds,
                    "vad_lead_seconds": self.settings.vad_lead_seconds,
                    "bulk_audio_rate": self.settings.bulk_audio_rate,
                    "heartbeat_seconds": self.settings.heartbeat_seconds,
                },
            ),
        )

    def _on_chunk(self, session: Session, identity: bytes, msg: p.Chunk) -> None:
        if msg.pcm.size > self._max_chunk_samples:  # samples as sent, at any rate (limits.max_chunk_samples)
            raise p.ProtocolError(
                p.ErrorCode.TOO_LARGE,
                f"chunk of {msg.pcm.size} samples is over the {self._max_chunk_samples}-sample cap "
                "(limits.max_chunk_samples); send smaller chunks",
                msg.id,
            )
        samples = int(np.ceil(msg.pcm.size * p.SAMPLE_RATE / msg.rate))
        session.check_cap(samples, ref=msg.id)
        self.sessions.check_room(session, samples, ref=msg.id)
        # Live audio (within vad_lead_seconds of real time for this client) is always taken; audio further ahead
        # draws from a daemon-wide budget, so that dumping recordings at wire speed cannot eat the IO thread.
        seconds, now = samples / p.SAMPLE_RATE, time.monotonic()
        arrives = max(session.clock, now) + seconds
        if arrives - now > self.settings.vad_lead_seconds and not self._bulk.take(seconds):
            raise p.ProtocolError(
                p.ErrorCode.OVERLOADED,
                f"audio is arriving faster than real time from all clients together (more than "
                f"{self.settings.bulk_audio_rate:g} s of audio per second); chunk refused, buffered audio kept: "
                "send at real time, or wait and resend",
                msg.id,
            )
        added = session.append(msg.pcm, msg.rate, ref=msg.id)
        session.clock = arrives
        if self.segmenter is not None:
            self.segmenter.audio(session.key, session.utterance, added)

    def _on_ask(self, session: Session, identity: bytes, msg: p.Ask) -> None:
        if session.active_ask is not None:
            raise p.ProtocolError(
                p.ErrorCode.BUSY,
                f"this client's ask {session.active_ask} is still running; cancel it or wait",
                msg.id,
            )
        if len(self._jobs) > self.settings.queue_depth:  # one running, queue_depth waiting
            raise p.ProtocolError(
                p.ErrorCode.BUSY,
                f"the daemon is busy ({self.settings.queue_depth} asks waiting); try again shortly",
                msg.id,
            )
        pcm = None
        if msg.text is None:
            flushed = session.flush()
            if self.segmenter is not None:
                self.segmenter.audio(session.key, session.utterance, flushed)
            pcm = session.take_audio()
            if pcm.size == 0:
                raise p.ProtocolError(
                    p.ErrorCode.NO_AUDIO,
                    "ask has no text and no audio was sent before it (send `chunk`s)",
                    msg.id,
                )
            if pcm.size < p.MIN_ASK_SAMPLES:
                session.put_back(pcm)
                raise p.ProtocolError(
                    p.ErrorCode.NOT_ENOUGH_AUDIO,
                    f"not enough audio: {pcm.size / p.SAMPLE_RATE:.2f} s buffered, at least "
                    f"{p.MIN_ASK_SAMPLES / p.SAMPLE_RATE:.2f} s needed (audio kept; send more or `reset`)",
                    msg.id,
                )
        settings = self.settings
        job = AskJob(
            identity=session.key,
            ask_id=msg.id,
            text=msg.text,
            pcm=pcm,
            max_tokens=msg.max_tokens or settings.max_tokens,
            temperature=settings.temperature if msg.temperature is None else msg.temperature,
            language=msg.language or settings.language,
            stream=msg.stream,
            system_prompt=msg.system_prompt if msg.system_prompt is not None else settings.system_prompt,
            client_label=_label(session),
            utterance=session.utterance,
        )
        if pcm is not None and self.segmenter is not None:
            self.segmenter.ask(job)  # behind this recording's stretches
        else:
            self.worker.submit(job)
        if pcm is not None:
            session.utterance += 1
        session.active_ask = msg.id
        self._jobs[session.key] = job

    def _on_cancel(self, session: Session, identity: bytes, msg: p.Cancel) -> None:
        job = self._jobs.get(session.key)
        if job is None or session.active_ask is None:
            raise p.ProtocolError(p.ErrorCode.NOTHING_TO_CANCEL, "no ask of this client is running", msg.id)
        self._send(identity, p.Ok(ref=msg.id))
        self._cancel(session, job)

    def _cancel(self, session: Session, job: AskJob) -> None:
        """Stop this client's ask: a queued one ends now (the client is free at once), a running one between
        tokens."""
        if job.withdraw():
            cancelled = p.Error(ref=job.ask_id, code=p.ErrorCode.CANCELLED, text="the ask was cancelled")
            self._deliver(session.key, cancelled, True)
        else:
            job.cancelled.set()

    def _on_reset(self, session: Session, identity: bytes, msg: p.Reset) -> None:
        dropped = session.clear()
        session.utterance += 1
        if msg.conversation:
            self._forget(session.key)
        elif self.segmenter is not None:
            self.segmenter.reset(session.key)
        self._send(identity, p.Ok(ref=msg.id, dropped_seconds=round(dropped, 3)))
        job = self._jobs.get(session.key)
        if job is not None and session.active_ask is not None:
            self._cancel(session, job)

    def _on_warm(self, session: Session | None, identity: bytes, msg: p.Warm) -> None:
        self.worker.submit(WarmJob())
        self._send(identity, p.Ok(ref=msg.id))

    def _on_status(self, session: Session | None, identity: bytes, msg: p.Status) -> None:
        worker = self.worker
        self._send(
            identity,
            p.Report(
                ref=msg.id,
                uptime=round(time.monotonic() - self._started, 3),
                models={
                    "whisper": _model_report(worker.whisper),
                    "llm": _model_report(worker.llm),
                    "ready": worker.ready.is_set(),
                },
                sessions=len(self.sessions),
                queue=worker.pending(),
                buffered_seconds=round(session.buffered_seconds, 3) if session is not None else 0.0,
                asks_served=worker.asks_served,
                memory_bytes=resident_memory(),
                buffered_seconds_total=round(self.sessions.buffered_samples() / p.SAMPLE_RATE, 3),
                listening_seconds=round(self.segmenter.pending_seconds(), 3) if self.segmenter is not None else 0.0,
            ),
        )

    # ---- replies ----
    def _emit_threadsafe(self, key: bytes, msg: p.Message, final: bool) -> None:
        """Called from the model thread: hop onto the loop, which alone touches the socket."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, key, msg, final)
        except RuntimeError:  # the loop closed while the model thread finished an ask during shutdown
            log.debug("dropped %s for %s: the daemon is shutting down", msg.TYPE, key.hex())

    def _deliver(self, key: bytes, msg: p.Message, final: bool) -> None:
        """A reply for the session ``key``; dropped when that session is gone (its routing id may be another
        client's by now)."""
        session = self.sessions.by_key(key)
        if final:
            job = self._jobs.get(key)
            if job is not None and job.ask_id == getattr(msg, "ref", None):
                del self._jobs[key]
                if session is not None:
                    session.active_ask = None
        if session is not None:
            self._send(session.identity, msg)

    def _send(self, identity: bytes, msg: p.Message) -> None:
        assert self._socket is not None
        # With DONTWAIT, pyzmq's asyncio socket tries the send at once and returns an already finished future.
        future = cast(
            "asyncio.Future[Any]", self._socket.send_multipart([identity, *p.encode(msg)], flags=zmq.DONTWAIT)
        )
        exc = future.exception() if future.done() else None
        if exc is None:
            return
        if isinstance(exc, zmq.ZMQError) and exc.errno == zmq.EHOSTUNREACH:
            self._client_gone(identity)
        else:
            log.warning("could not send %s to %s: %s", msg.TYPE, identity.hex(), exc)

    def _client_gone(self, identity: bytes) -> None:
        """The peer disconnected (ROUTER_MANDATORY told us before the monitor did): end its session."""
        session = self.sessions.find(identity)
        if session is not None:
            log.info("client %s vanished", _label(session))
            self._end_session(session)

    def _end_session(self, session: Session) -> None:
        """The client is gone (or its routing id now names another connection): cancel its ask, drop its audio,
        its queued segmenter work and its conversation. Replies still coming for it are discarded (`_deliver`)."""
        self.sessions.drop(session.identity)
        job = self._jobs.get(session.key)
        if job is not None:
            log.info("client %s vanished; cancelling ask %s", _label(session), job.ask_id)
            if job.withdraw():
                del self._jobs[session.key]
            else:
                job.cancelled.set()
        if session.clear() >= TRIM_AFTER_SECONDS:
            self._trim_due = True
        self._forget(session.key)

    def _forget(self, key: bytes) -> None:
        if self.segmenter is not None:
            self.segmenter.drop(key)
        self.worker.submit(ForgetJob(key))


SESSIONLESS = frozenset({"hello", "status", "warm"})
"""Messages served without making a session: probes hold no state. (`hello` names an existing session in logs.)"""


def _peer_of(frame: zmq.Frame) -> Peer:
    fd = frame.get(zmq.SRCFD)
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:  # no ZAP handler (ipc, or --insecure-loopback)
        user = None
    return Peer(fd=fd if isinstance(fd, int) and fd >= 0 else None, user=user if isinstance(user, str) else None)


def _shutting_down(ask_id: str) -> p.Error:
    return p.Error(ref=ask_id, code=p.ErrorCode.SHUTTING_DOWN, text="the daemon is shutting down")


def _label(session: Session) -> str:
    name = session.client_name or "client"
    return f"{name}:{session.identity.hex()[:8]}"


def _model_report(state: ModelState) -> dict[str, Any]:
    return {
        "name": state.name,
        "engine": state.engine,
        "engine_reason": state.engine_reason,
        "loaded": state.loaded,
        "error": state.error,
        "load_seconds": None if state.load_seconds is None else round(state.load_seconds, 3),
        "loads": state.loads,
        "idle_seconds": round(state.idle_seconds(), 1),
        "keep_alive": state.keep_alive,
    }


def trim_heap() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``; nothing elsewhere).

    Audio chunks of a few MB are allocated from glibc's heap once its mmap threshold has adapted upwards, and a
    freed heap is not given back on its own: without this, the RSS stays at its peak after clients who buffered
    minutes of audio have gone."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):  # another libc (musl)
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def resident_memory() -> int:
    """Current resident set size in bytes (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
