"""The IO side of the daemon: an asyncio loop that owns the ROUTER socket, decodes, dispatches and replies.

Every client message is handled to completion here, in arrival order, so a client's `ask` always sees the chunks it
sent before it. Anything a client gets wrong is answered with an `error` and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, cast

import zmq
import zmq.asyncio

from sottovoce.client import protocol as p
from sottovoce.client.config import Settings

from .segmenter import Segmenter
from .sessions import Session, SessionTable
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


class Server:
    def __init__(self, settings: Settings, worker_factory: Any, *, version: str) -> None:
        """``worker_factory(emit) -> ModelWorker``: the worker needs the thread-safe emit this server provides."""
        self.settings = settings
        self.version = version
        self.sessions = SessionTable(buffer_seconds=settings.buffer_seconds)
        self._max_chunk_samples = int(settings.max_chunk_seconds * p.SAMPLE_RATE)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._jobs: dict[bytes, AskJob] = {}
        self._stopping: asyncio.Event | None = None
        self._started = time.monotonic()
        self.worker: ModelWorker = worker_factory(self._emit_threadsafe)
        self.segmenter = Segmenter(self.worker.submit, idle=self.worker.idle) if settings.incremental else None

    # ---- lifecycle ----
    async def serve(self, socket: zmq.asyncio.Socket) -> None:
        """Serve until ``stop()``; the caller made and bound the socket (see daemon.main)."""
        self._loop = asyncio.get_running_loop()
        self._socket = socket
        self._stopping = asyncio.Event()
        self.worker.start()
        if self.segmenter is not None:
            self.segmenter.start()
        expiry = asyncio.create_task(self._expire_sessions())
        receiver = asyncio.create_task(self._receive_forever())
        await self._stopping.wait()
        receiver.cancel()
        expiry.cancel()
        for task in (receiver, expiry):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for job in self._jobs.values():
            job.cancelled.set()
        if self.segmenter is not None:
            await asyncio.to_thread(self.segmenter.stop)
        await asyncio.to_thread(self.worker.stop)

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def _receive_forever(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            try:
                self.handle(frames)
            except Exception:  # never let one message take the daemon down
                log.exception("internal error handling a message")
                if frames:
                    self._send(frames[0], p.Error(code=p.ErrorCode.INTERNAL, text="internal error; see daemon log"))

    async def _expire_sessions(self) -> None:
        while True:
            await asyncio.sleep(min(EXPIRY_PERIOD, self.settings.session_idle_seconds))
            for session in self.sessions.expire(self.settings.session_idle_seconds):
                self._forget(session.identity)
                log.info(
                    "session %s expired after %.0f s idle",
                    _label(session),
                    self.settings.session_idle_seconds,
                )

    # ---- dispatch ----
    def handle(self, frames: list[bytes]) -> None:
        identity, body = frames[0], frames[1:]
        try:
            msg = p.decode(body, allowed=p.CLIENT_TYPES)
        except p.ProtocolError as exc:
            log.warning("bad message from %s: %s", identity.hex(), exc.text)
            self._send(identity, p.error_reply(exc))
            return
        session = self.sessions.get(identity)
        try:
            handler = getattr(self, "_on_" + msg.TYPE)
            handler(session, msg)
        except p.ProtocolError as exc:
            self._send(identity, p.error_reply(exc))

    def _on_hello(self, session: Session, msg: p.Hello) -> None:
        session.client_name = msg.client
        major = msg.protocol.split(".", 1)[0]
        if major != str(p.PROTOCOL_MAJOR):
            raise p.ProtocolError(
                p.ErrorCode.VERSION,
                f"client speaks protocol {msg.protocol}; this daemon speaks {p.PROTOCOL_VERSION}",
                msg.id,
            )
        self._send(
            session.identity,
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
                },
            ),
        )

    def _on_chunk(self, session: Session, msg: p.Chunk) -> None:
        samples_at_16k = msg.pcm.size * p.SAMPLE_RATE / msg.rate
        if samples_at_16k > self._max_chunk_samples:
            raise p.ProtocolError(
                p.ErrorCode.TOO_LARGE,
                f"chunk of {samples_at_16k / p.SAMPLE_RATE:.1f} s is over the "
                f"{self.settings.max_chunk_seconds:g} s cap; send smaller chunks",
                msg.id,
            )
        added = session.append(msg.pcm, msg.rate, ref=msg.id)
        if self.segmenter is not None:
            self.segmenter.audio(session.identity, session.utterance, added)

    def _on_ask(self, session: Session, msg: p.Ask) -> None:
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
                self.segmenter.audio(session.identity, session.utterance, flushed)
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
            identity=session.identity,
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
        self._jobs[session.identity] = job

    def _on_cancel(self, session: Session, msg: p.Cancel) -> None:
        job = self._jobs.get(session.identity)
        if job is None:
            raise p.ProtocolError(p.ErrorCode.NOTHING_TO_CANCEL, "no ask of this client is running", msg.id)
        job.cancelled.set()
        self._send(session.identity, p.Ok(ref=msg.id))

    def _on_reset(self, session: Session, msg: p.Reset) -> None:
        job = self._jobs.get(session.identity)
        if job is not None:
            job.cancelled.set()
        dropped = session.clear()
        session.utterance += 1
        if msg.conversation:
            self._forget(session.identity)
        elif self.segmenter is not None:
            self.segmenter.drop(session.identity)
        self._send(session.identity, p.Ok(ref=msg.id, dropped_seconds=round(dropped, 3)))

    def _on_warm(self, session: Session, msg: p.Warm) -> None:
        self.worker.submit(WarmJob())
        self._send(session.identity, p.Ok(ref=msg.id))

    def _on_status(self, session: Session, msg: p.Status) -> None:
        worker = self.worker
        self._send(
            session.identity,
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
                buffered_seconds=round(session.buffered_seconds, 3),
                asks_served=worker.asks_served,
                memory_bytes=resident_memory(),
            ),
        )

    # ---- replies ----
    def _emit_threadsafe(self, identity: bytes, msg: p.Message, final: bool) -> None:
        """Called from the model thread: hop onto the loop, which alone touches the socket."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, identity, msg, final)
        except RuntimeError:  # the loop closed while the model thread finished an ask during shutdown
            log.debug("dropped %s for %s: the daemon is shutting down", msg.TYPE, identity.hex())

    def _deliver(self, identity: bytes, msg: p.Message, final: bool) -> None:
        if final:
            job = self._jobs.get(identity)
            if job is not None and job.ask_id == getattr(msg, "ref", None):
                del self._jobs[identity]
                session = self.sessions.find(identity)
                if session is not None:
                    session.active_ask = None
        self._send(identity, msg)

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
        """The peer disconnected (ROUTER_MANDATORY told us): stop its ask and forget its session."""
        job = self._jobs.get(identity)
        if job is not None and not job.cancelled.is_set():
            log.info("client %s vanished; cancelling ask %s", identity.hex(), job.ask_id)
            job.cancelled.set()
        if job is None:
            self.sessions.drop(identity)
            self._forget(identity)

    def _forget(self, identity: bytes) -> None:
        if self.segmenter is not None:
            self.segmenter.drop(identity)
        self.worker.submit(ForgetJob(identity))


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


def resident_memory() -> int:
    """Current resident set size in bytes (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
