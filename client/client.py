"""A blocking client for scripts and the tray: one DEALER socket, so chunks and the ask that follows stay in order.

    from sottovoce.client import Client
    with Client() as c:
        print(c.ask("What is the capital of France?").answer)
        for event in c.stream(audio=pcm):          # Transcript, AnswerChunk..., Done
            ...

Not thread-safe (a ZeroMQ socket belongs to one thread): give each thread its own Client.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import config, paths, security
from . import protocol as p
from .errors import DaemonUnavailable, RemoteError, Timeout, VersionMismatch, remote_error

STREAM_CHUNK_SAMPLES = p.SAMPLE_RATE  # 1 s per message when sending a whole recording at once
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
"""ZMTP heartbeats: a daemon that stops answering pings for 3 s (frozen, or its machine gone) is disconnected. A
daemon that dies is noticed at once, from the connection closing (the socket monitor's EVENT_DISCONNECTED)."""


@dataclasses.dataclass(frozen=True)
class Answer:
    """The result of an ask: the seed's Response (transcript, answer, token counts, seconds per stage)."""

    answer: str
    transcript: str | None
    no_speech: bool
    language: str | None
    prompt_tokens: int
    cached_tokens: int
    tokens: int
    finish_reason: str | None
    seconds: dict[str, float]
    warnings: tuple[str, ...] = ()
    """Refused chunks seen during the ask (e.g. the buffer cap was reached): the answer covers less audio."""

    @classmethod
    def from_done(cls, done: p.Done, warnings: list[str]) -> Answer:
        return cls(
            answer=done.answer,
            transcript=done.transcript,
            no_speech=done.no_speech,
            language=done.language,
            prompt_tokens=done.prompt_tokens,
            cached_tokens=done.cached_tokens,
            tokens=done.tokens,
            finish_reason=done.finish_reason,
            seconds=dict(done.seconds),
            warnings=tuple(warnings),
        )


class Client:
    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        name: str = "sottovoce-client",
        context: zmq.Context[Any] | None = None,
    ) -> None:
        """``timeout``: longest silence from the daemon during a request; ``connect_timeout``: for the handshake."""
        self.endpoint = endpoint or config.load()[0].endpoint
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.name = name
        self.info: p.Info | None = None
        self.chunk_errors: list[RemoteError] = []
        """Chunks the daemon refused (it answers a chunk only when refusing it)."""
        self.transcript_chunks: collections.deque[p.TranscriptChunk] = collections.deque(maxlen=256)
        """Early transcripts of the current recording, received so far (see `drain`)."""
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Queue nothing while no daemon is connected: otherwise a restarted daemon would replay what was sent to a
        # dead one (an abandoned ask would run again).
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        security.secure_client_socket(self._sock, self.endpoint)
        # The monitor tells when the connection closes: the daemon died or stopped, and no reply will come.
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._sock.connect(self.endpoint)
        self._open: dict[str, collections.deque[p.Message]] = {}
        """Replies received for requests still waiting, by request id."""
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    # ---- lifecycle ----
    def close(self) -> None:
        if self._monitor.closed:
            return
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests ----
    def hello(self) -> p.Info:
        """Handshake: checks that a daemon is there and speaks our protocol major version."""
        self._check_socket_file()
        msg = p.Hello(client=self.name)
        self._send(msg)
        try:
            reply = self._wait_for(msg.id, self.connect_timeout, waiting_for="the handshake")
        except Timeout:
            raise DaemonUnavailable(f"sottovoce daemon not responding at {self.endpoint}") from None
        except RemoteError as exc:
            if exc.code == p.ErrorCode.VERSION:
                raise VersionMismatch(exc.text) from None
            raise
        finally:
            self._open.pop(msg.id, None)
        if not isinstance(reply, p.Info):
            raise VersionMismatch(f"unexpected reply to hello: {reply.TYPE}")
        if reply.protocol.split(".")[0] != str(p.PROTOCOL_MAJOR):
            raise VersionMismatch(
                f"the daemon speaks protocol {reply.protocol}, this client {p.PROTOCOL_VERSION}: upgrade the older one"
            )
        self.info = reply
        return reply

    def status(self) -> p.Report:
        self._ensure_hello()
        reply = self._request(p.Status())
        assert isinstance(reply, p.Report)
        return reply

    def send_chunk(self, pcm: np.ndarray, rate: int = p.SAMPLE_RATE) -> str:
        """Append mono float32 PCM to this client's buffer on the daemon; returns the chunk's id."""
        self._ensure_hello()
        msg = p.Chunk(pcm=_as_mono_float32(pcm), rate=rate)
        self._send(msg)
        return msg.id

    def reset(self, *, conversation: bool = True) -> float:
        """Drop the buffered audio (and cancel a running ask) and, with ``conversation``, the remembered
        conversation; returns the seconds of audio dropped."""
        self._ensure_hello()
        reply = self._request(p.Reset(conversation=conversation))
        assert isinstance(reply, p.Ok)
        return reply.dropped_seconds

    def warm(self) -> None:
        """Ask the daemon to load models that keep-alive unloaded (send it when a recording starts)."""
        self._ensure_hello()
        self._request(p.Warm())

    def cancel(self) -> None:
        """Cancel this client's running ask (from the thread that iterates its stream, between events)."""
        self._ensure_hello()
        self._request(p.Cancel())

    def ask(
        self,
        text: str | None = None,
        *,
        audio: np.ndarray | None = None,
        rate: int = p.SAMPLE_RATE,
        on_event: Callable[[p.Message], None] | None = None,
        **options: Any,
    ) -> Answer:
        """Ask and wait for the whole answer. ``on_event`` sees each Transcript / AnswerChunk as it arrives."""
        warnings: list[str] = []
        for event in self.stream(text, audio=audio, rate=rate, warnings=warnings, **options):
            if isinstance(event, p.Done):
                return Answer.from_done(event, warnings)
            if on_event is not None:
                on_event(event)
        raise AssertionError("stream ended without done")  # pragma: no cover

    def stream(
        self,
        text: str | None = None,
        *,
        audio: np.ndarray | None = None,
        rate: int = p.SAMPLE_RATE,
        warnings: list[str] | None = None,
        **options: Any,
    ) -> Iterator[p.Message]:
        """Ask and yield the replies as they come: Transcript (voice), AnswerChunk..., then Done.

        With ``audio``, the recording is sent as chunks first; with neither ``text`` nor ``audio``, the daemon uses
        the chunks already sent with ``send_chunk``. Options: max_tokens, temperature, language, system_prompt.
        """
        if text is not None and audio is not None:
            raise ValueError("ask with text or audio, not both")
        if audio is not None:
            self._ensure_hello()
            pcm = _as_mono_float32(audio)
            for start in range(0, pcm.size, STREAM_CHUNK_SAMPLES):
                self.send_chunk(pcm[start : start + STREAM_CHUNK_SAMPLES], rate)
        ask_id = self.begin_ask(text, **options)
        seen_errors = len(self.chunk_errors)
        try:
            while True:
                reply = self._wait_for(ask_id, self.timeout, waiting_for="the answer")
                if warnings is not None and len(self.chunk_errors) > seen_errors:
                    warnings.extend(e.text for e in self.chunk_errors[seen_errors:])
                    seen_errors = len(self.chunk_errors)
                yield reply
                if isinstance(reply, p.Done):
                    return
        finally:
            self.forget(ask_id)

    def begin_ask(self, text: str | None = None, **options: Any) -> str:
        """Send an ask without waiting (for event loops that must stay responsive); read its replies with
        `next_reply` and call `forget` when done with it. Returns the ask's id."""
        self._ensure_hello()
        msg = p.Ask(text=text, stream=options.pop("stream", True), **options)
        msg.validate()
        self._open[msg.id] = collections.deque()  # replies that arrive while waiting for something else are kept
        self._send(msg)
        return msg.id

    def next_reply(self, ask_id: str, timeout: float) -> p.Message | None:
        """The next reply to ``ask_id``, or None after ``timeout`` seconds; its `error` raises RemoteError."""
        try:
            return self._wait_for(ask_id, timeout, waiting_for="the answer")
        except Timeout:
            return None

    def forget(self, ask_id: str) -> None:
        """Stop keeping replies for ``ask_id`` (late ones are dropped)."""
        self._open.pop(ask_id, None)

    def drain(self, timeout: float = 0.0) -> list[p.TranscriptChunk]:
        """Read what the daemon sent unasked for up to ``timeout`` seconds (refused chunks go to `chunk_errors`);
        return the early transcripts received since the last call."""
        deadline = time.monotonic() + timeout
        while self._poll(max(0, int((deadline - time.monotonic()) * 1000)), waiting_for="early transcripts"):
            self._receive_one()
            if time.monotonic() >= deadline:
                break
        chunks = list(self.transcript_chunks)
        self.transcript_chunks.clear()
        return chunks

    # ---- plumbing ----
    def _ensure_hello(self) -> None:
        if self.info is None:
            self.hello()

    def _check_socket_file(self) -> None:
        # A ZeroMQ connect never fails: an absent ipc file is the clearest "not running" sign there is.
        path = paths.ipc_path(self.endpoint)
        try:
            exists = path is None or path.exists()
        except PermissionError:
            raise DaemonUnavailable(f"{self.endpoint} belongs to another user: it is not your daemon") from None
        if not exists:
            raise DaemonUnavailable(f"sottovoce daemon not running at {self.endpoint} (start it: `sottovoce daemon`)")

    def _send(self, msg: p.Message) -> None:
        self._read_monitor()  # a disconnect before this request is history: ZeroMQ reconnects by itself
        if not self._sock.poll(int(self.connect_timeout * 1000), zmq.POLLOUT):
            self._check_socket_file()
            raise DaemonUnavailable(f"no sottovoce daemon is connected at {self.endpoint}")
        try:
            self._sock.send_multipart(p.encode(msg), flags=zmq.DONTWAIT)
        except zmq.Again:
            raise DaemonUnavailable(f"cannot send to {self.endpoint}: the daemon is not reading") from None

    def _request(self, msg: p.Message) -> p.Message:
        self._send(msg)
        try:
            return self._wait_for(msg.id, self.timeout, waiting_for=msg.TYPE)
        finally:
            self._open.pop(msg.id, None)

    def _wait_for(self, ref: str, timeout: float, *, waiting_for: str) -> p.Message:
        """Next reply to request ``ref``. Its error raises; replies to other open requests are kept for them
        (a `cancel` sent mid-stream must not eat the stream's own replies); refused chunks are recorded."""
        queued = self._open.setdefault(ref, collections.deque())
        deadline = time.monotonic() + timeout
        while not queued:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poll(max(1, int(remaining * 1000)), waiting_for=waiting_for):
                self._check_socket_file()
                raise Timeout(
                    f"no reply from the daemon at {self.endpoint} for {timeout:g} s while waiting for {waiting_for}"
                )
            self._receive_one()
        reply = queued.popleft()
        if isinstance(reply, p.Error | p.Done):
            self._open.pop(ref, None)
        if isinstance(reply, p.Error):
            raise remote_error(reply.code, reply.text, reply.ref)
        return reply

    def _poll(self, timeout_ms: int, *, waiting_for: str) -> bool:
        """Wait until a message can be read (True) or ``timeout_ms`` passes (False); raise DaemonUnavailable as soon
        as the connection to the daemon closes, since nothing sent before it will be answered."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            ready = dict(self._poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
            if self._sock in ready:
                return True  # replies already received come before the news of a disconnect
            if self._monitor in ready and self._read_monitor():
                self._check_socket_file()
                raise DaemonUnavailable(
                    f"the daemon at {self.endpoint} closed the connection (it stopped or died) "
                    f"while this client was waiting for {waiting_for}"
                )
            if not ready or time.monotonic() >= deadline:
                return False

    def _read_monitor(self) -> bool:
        """Consume the monitor's events; True if the connection closed (and did not come back since)."""
        lost = False
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            lost = event == zmq.EVENT_DISCONNECTED
        return lost

    def _receive_one(self) -> None:
        """Read one message and file it: under its open request, as an early transcript, or as a refused chunk."""
        try:
            reply = p.decode(self._sock.recv_multipart())
        except p.ProtocolError as exc:
            raise RemoteError(exc.code, f"undecodable reply from the daemon: {exc.text}") from None
        reply_ref = getattr(reply, "ref", None)
        if isinstance(reply, p.TranscriptChunk):
            self.transcript_chunks.append(reply)
        elif reply_ref in self._open:
            self._open[reply_ref].append(reply)
        elif isinstance(reply, p.Error) and reply_ref is None:
            raise remote_error(reply.code, reply.text)
        elif isinstance(reply, p.Error):
            self.chunk_errors.append(remote_error(reply.code, reply.text, reply_ref))
        # else: a late reply to an abandoned request (after a timeout): dropped.


def _as_mono_float32(pcm: np.ndarray) -> np.ndarray:
    arr = np.asarray(pcm)
    if arr.ndim == 2:
        arr = arr.mean(axis=1) if arr.shape[1] <= 8 else arr.mean(axis=0)
    if arr.ndim != 1:
        raise ValueError(f"audio must be mono (1-D) or (frames, channels), got shape {arr.shape}")
    if arr.dtype.kind == "i":
        arr = arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)
    return np.ascontiguousarray(arr, dtype=np.float32)
