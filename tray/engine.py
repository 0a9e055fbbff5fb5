"""The tray's IO thread: it alone owns the client's DEALER socket and the microphone stream.

It waits on one ``Mailbox`` that holds the controller's commands and the microphone's blocks. Between key presses
it keeps the newest audio as pre-roll; while recording it cuts the audio into 4096-sample chunks and sends each as
a ``chunk``; on release it sends the ``ask`` on the same socket (so the daemon sees every chunk before the ask),
then streams the replies back to the controller as events. It also watches the daemon:

- a heartbeat (``status``) every couple of seconds, and every second while recording; the tray starts before the
  daemon and connects when it appears;
- a daemon restarted mid-recording is caught by the heartbeat (its uptime went back, or it holds less of our
  audio than we sent) and the turn fails with a clear message instead of asking with half the audio;
- while an answer is awaited, a silent daemon is probed every two seconds, so a dead one ends the turn in seconds,
  never a hang.

Everything it learns goes to the controller as ``state`` events tagged with the turn they belong to.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeAlias

import numpy as np

from sottovoce.client import protocol as p
from sottovoce.client.client import Client
from sottovoce.client.errors import RemoteError, SottovoceError

from . import state as s
from .audio import (
    SILENT_MIC,
    STALLED_MIC,
    AudioBlock,
    Mailbox,
    Microphone,
    MicrophoneError,
    PreRoll,
    Recording,
    Resampler,
)

log = logging.getLogger(__name__)

HEARTBEAT_IDLE = 2.0
HEARTBEAT_RECORDING = 1.0
RECONNECT_EVERY = 1.0
REQUEST_TIMEOUT = 3.0
"""For hello/status/reset: the daemon's IO loop answers these at once even while a model runs."""
PROBE_AFTER_SILENCE = 2.0
"""While an answer is awaited: probe the daemon after this long without a reply."""
ANSWER_TIMEOUT = 600.0
"""Give up on an answer after this long (the daemon may have a long queue; the person can re-ask any time)."""
BUSY_RETRY_FOR = 15.0
"""A new ask right after a cancelled one may meet `busy` while the old one winds down: retry this long."""
TAIL_MAX = 1.0
"""After the release, wait at most this long for the audio captured before it (PortAudio delivers late)."""
MIC_RETRY_EVERY = 3.0
ANSWER_POLL = 0.05
DRAIN_EVERY = 0.5
"""While recording: read the daemon's early transcripts this often."""


# ---- commands from the controller ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Start:
    turn: int
    at: float


@dataclasses.dataclass(frozen=True)
class Stop:
    turn: int
    at: float


@dataclasses.dataclass(frozen=True)
class Cancel:
    turn: int


@dataclasses.dataclass(frozen=True)
class ForgetConversation:
    pass


@dataclasses.dataclass(frozen=True)
class SetMicrophone:
    name: str | None


@dataclasses.dataclass(frozen=True)
class Shutdown:
    pass


TrayClient: TypeAlias = Client
"""The tray's IO thread uses `Client.begin_ask` / `next_reply` / `forget` to stay responsive during an answer."""


@dataclasses.dataclass
class _Turn:
    turn: int
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    recording: Recording | None = None
    sent_samples: int = 0
    tail_deadline: float | None = None
    next_drain: float = 0.0
    ask_id: str | None = None
    ask_sent_at: float = 0.0
    busy_until: float = 0.0
    last_reply_at: float = 0.0
    transcript: str | None = None
    answer: list[str] = dataclasses.field(default_factory=list)


class Engine(threading.Thread):
    """The IO thread. ``post`` receives ``state`` events (it must be thread-safe and must not block)."""

    def __init__(
        self,
        post: Callable[[s.Event], None],
        *,
        endpoint: str,
        microphone: str | None = None,
        preroll_seconds: float = 0.3,
        keep_mic_open: bool | None = None,
        microphone_factory: Callable[[Callable[[AudioBlock], None]], Microphone] | None = None,
        client_factory: Callable[[str], TrayClient] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="tray-io", daemon=True)
        self.post = post
        self.endpoint = endpoint
        self.mic_name = microphone
        self.preroll_seconds = preroll_seconds
        self.keep_mic_open = preroll_seconds > 0 if keep_mic_open is None else keep_mic_open
        """Pre-roll needs the stream running before the press; without it the mic is open only while recording
        (the first ~0.5-1.6 s after opening are lost on PortAudio/PulseAudio: see bench/TRAY.md)."""
        self.mailbox = Mailbox(max_audio_blocks=400)
        self._mic_factory = microphone_factory or (lambda sink: Microphone(sink))
        self._client_factory = client_factory or self._new_client
        self.clock = clock
        self.mic: Microphone | None = None
        self._resampler: Resampler | None = None
        self._preroll = PreRoll(max(preroll_seconds, 0.0))
        self._client: TrayClient | None = None
        self._connected = False
        self._down_reason: str | None = None
        self._uptime: tuple[float, float] | None = None  # (daemon uptime, our clock) at the last report
        self._buffer_cap = float("inf")
        self._version = "?"
        self._description = ""
        self._next_heartbeat = 0.0
        self._next_mic_try = 0.0
        self._mic_error: str | None = None
        self._mic_pending_ok: tuple[str, str | None] | None = None
        self.devices: list[str] = []
        """Input device names seen at the last microphone open (the tray's Microphone menu shows them)."""
        self._turn: _Turn | None = None
        self._reopen_mic_after_turn = False
        self._timed_blocks = True
        self._stopping = False

    # ---- the controller's side ----
    def command(self, cmd: object) -> None:
        self.mailbox.put_command(cmd)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.command(Shutdown())
        if self.is_alive():
            self.join(timeout)

    # ---- the loop ----
    def run(self) -> None:
        try:
            if self.keep_mic_open:
                self._try_open_mic()
            else:
                self.post(s.MicOk("opened when recording"))
            self._heartbeat(self.clock())
            while not self._stopping:
                if self._turn is not None and self._turn.ask_id is not None:
                    self._pump_answer(ANSWER_POLL)
                    item = self.mailbox.get(0)
                else:
                    item = self.mailbox.get(max(0.0, self._next_deadline() - self.clock()))
                while item is not None and not self._stopping:
                    self._handle(item)
                    item = self.mailbox.get(0) if isinstance(item, AudioBlock) else None
                self._service(self.clock())
        except Exception:
            log.exception("the tray's IO thread failed")
            self.post(s.DaemonDown("internal error in the tray's IO thread; see the log"))
        finally:
            self._close_mic()
            if self._client is not None:
                self._client.close()

    def _next_deadline(self) -> float:
        deadline = self._next_heartbeat
        turn = self._turn
        if turn is not None and turn.tail_deadline is not None:
            deadline = min(deadline, turn.tail_deadline)
        if self.mic is not None:
            deadline = min(deadline, self.clock() + 0.5)  # the stall watchdog
        elif self.keep_mic_open:
            deadline = min(deadline, self._next_mic_try)
        return deadline

    def _handle(self, item: object) -> None:
        if isinstance(item, AudioBlock):
            self._on_block(item)
        elif isinstance(item, Start):
            self._on_start(item)
        elif isinstance(item, Stop):
            self._on_stop(item)
        elif isinstance(item, Cancel):
            self._on_cancel(item)
        elif isinstance(item, SetMicrophone):
            self._on_set_mic(item)
        elif isinstance(item, ForgetConversation):
            self._on_forget_conversation()
        elif isinstance(item, Shutdown):
            self._on_shutdown()

    def _service(self, now: float) -> None:
        turn = self._turn
        if turn is not None and turn.tail_deadline is not None and now >= turn.tail_deadline:
            log.debug("turn %d: tail deadline reached", turn.turn)
            self._finish_recording()
        if self.mic is not None and self.mic.stalled(now):
            self._mic_failed(STALLED_MIC)
        if self.mic is None and self.keep_mic_open and now >= self._next_mic_try and self._turn is None:
            self._try_open_mic()
        if now >= self._next_heartbeat:
            self._heartbeat(now)

    # ---- the daemon ----
    def _new_client(self, endpoint: str) -> TrayClient:
        return TrayClient(endpoint, timeout=REQUEST_TIMEOUT, connect_timeout=REQUEST_TIMEOUT, name="sottovoce-tray")

    def _heartbeat(self, now: float) -> None:
        recording = self._turn is not None and self._turn.recording is not None
        self._next_heartbeat = now + (
            HEARTBEAT_RECORDING if recording else HEARTBEAT_IDLE if self._connected else RECONNECT_EVERY
        )
        if not self._connected:
            self._connect()
            return
        if self._turn is not None and self._turn.ask_id is not None:
            return  # _pump_answer probes while an answer is awaited
        self._check_daemon()

    def _connect(self) -> None:
        client = self._client_factory(self.endpoint)
        try:
            info = client.hello()
            report = client.status()
        except SottovoceError as exc:
            client.close()
            self._set_down(str(exc))
            return
        self._client = client
        self._connected = True
        self._down_reason = None
        self._uptime = (report.uptime, self.clock())
        self._buffer_cap = float(info.limits.get("buffer_seconds", float("inf")))
        self._version = info.version
        self._description = self._describe(report)
        log.info("connected to the daemon at %s: %s", self.endpoint, self._description)
        self.post(s.DaemonUp(self._description))

    def _set_down(self, reason: str) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        was_connected, self._connected = self._connected, False
        if was_connected or reason != self._down_reason:
            log.warning("daemon unreachable: %s", reason)
            self.post(s.DaemonDown(reason))
        self._down_reason = reason
        self._next_heartbeat = self.clock() + RECONNECT_EVERY

    def _check_daemon(self) -> str | None:
        """Probe the daemon; returns None if all is well, else what went wrong (after handling it)."""
        client = self._client
        assert client is not None
        try:
            report = client.status()
        except SottovoceError as exc:
            self._lose_daemon(f"the daemon stopped answering ({exc})")
            return "lost"
        now = self.clock()
        restarted = False
        if self._uptime is not None:
            expected = self._uptime[0] + (now - self._uptime[1])
            restarted = report.uptime + 1.0 < expected
        self._uptime = (report.uptime, now)
        turn = self._turn
        if turn is not None and turn.recording is not None and not restarted:
            expected_buffer = min(turn.sent_samples / p.SAMPLE_RATE, self._buffer_cap)
            restarted = report.buffered_seconds + 0.05 < expected_buffer
            if restarted:
                log.warning(
                    "turn %d: the daemon holds %.2f s of audio but %.2f s were sent",
                    turn.turn,
                    report.buffered_seconds,
                    expected_buffer,
                )
        if restarted:
            log.warning("the daemon restarted (uptime %.1f s)", report.uptime)
            if turn is not None:
                self._fail_turn(
                    "daemon-restarted",
                    "the daemon restarted during the "
                    + ("recording" if turn.recording is not None else "answer")
                    + "; the question was lost, please ask again",
                )
            self._description = self._describe(report)
            self.post(s.DaemonUp(self._description))
            return "restarted"
        description = self._describe(report)
        if description != self._description:  # e.g. the models finished loading
            self._description = description
            log.info("daemon: %s", description)
            self.post(s.DaemonUp(description))
        return None

    def _describe(self, report: p.Report) -> str:
        """ "whisper-tiny.en + smollm2 (daemon 0.1.0)", with "loading models…" or a model's error."""
        models = report.models
        names = []
        notes = []
        for role in ("whisper", "llm"):
            model = models.get(role)
            if isinstance(model, dict):
                names.append(str(model.get("name", "?")))
                if model.get("error"):
                    notes.append(f"{role} failed: {model['error']}")
            else:
                names.append(str(model or "?"))
        if not notes and models.get("ready") is False:
            notes.append("loading models…")
        text = f"{' + '.join(names)} (daemon {self._version})"
        return f"{text} — {'; '.join(notes)}" if notes else text

    def _lose_daemon(self, reason: str) -> None:
        if self._turn is not None:
            self._fail_turn("daemon-lost", f"lost the daemon: {reason}")
        self._set_down(reason)

    # ---- the microphone ----
    def _try_open_mic(self) -> bool:
        self._next_mic_try = self.clock() + MIC_RETRY_EVERY
        mic = self._mic_factory(self.mailbox.put_audio)
        try:
            warning = mic.open(self.mic_name, rescan=self._mic_error is not None)
        except MicrophoneError as exc:
            self._report_mic(str(exc))
            return False
        finally:
            self.devices = list(getattr(mic, "devices", []) or self.devices)
        self.mic = mic
        self._resampler = Resampler(mic.rate) if mic.rate != p.SAMPLE_RATE else None
        self._preroll.clear()
        self._timed_blocks = True
        if warning:
            log.warning("microphone: %s", warning)
        if self.keep_mic_open:
            # Ready once audio flows (PortAudio takes 0.5-1.6 s to start): announced by the first block.
            self._mic_pending_ok = (mic.device_name, warning)
        elif warning or self._mic_error is not None:
            self.post(s.MicOk(mic.device_name, warning))
        self._mic_error = None
        return True

    def _report_mic(self, message: str) -> None:
        log.warning("microphone: %s", message)
        self._mic_error = message
        self.post(s.MicProblem(message))

    def _close_mic(self) -> None:
        if self.mic is not None:
            self.mic.close()
            self.mic = None
        self._resampler = None
        self.mailbox.clear_audio()
        self._preroll.clear()

    def _mic_failed(self, message: str) -> None:
        self._close_mic()
        self._next_mic_try = self.clock() + MIC_RETRY_EVERY
        if self._turn is not None and self._turn.recording is not None:
            self._fail_turn("mic", message)
        self._report_mic(message)

    def _on_set_mic(self, cmd: SetMicrophone) -> None:
        self.mic_name = cmd.name
        if self._turn is not None and self._turn.recording is not None:
            self._reopen_mic_after_turn = True
            return
        if self.mic is not None or self.keep_mic_open:
            self._close_mic()
            self._try_open_mic()

    def _on_block(self, block: AudioBlock) -> None:
        if self.mic is None:
            return  # a straggler from a stream already closed
        if self._mic_pending_ok is not None:
            name, warning = self._mic_pending_ok
            self._mic_pending_ok = None
            log.info("microphone delivering audio (%.2f s after opening)", self.clock() - self.mic.opened_at)
            self.post(s.MicOk(name, warning))
        if self._resampler is not None:
            block = dataclasses.replace(block, pcm=self._resampler(block.pcm), rate=p.SAMPLE_RATE)
        self._timed_blocks = block.t0 is not None
        turn = self._turn
        rec = turn.recording if turn is not None else None
        if turn is not None and rec is not None and not rec.stopped:
            self._send_chunks(turn, rec.feed(block))
            if rec.covers_stop(block):
                self._finish_recording()
        elif self.keep_mic_open:
            self._preroll.add(block)

    # ---- a turn ----
    def _on_start(self, cmd: Start) -> None:
        if self._turn is not None:
            self._drop_turn()
        turn = _Turn(cmd.turn, timings={"key_down": cmd.at})
        if not self._connected or self._client is None:
            self._turn = turn
            self._fail_turn("daemon-lost", self._down_reason or "the daemon is not running")
            return
        if self.mic is None and not self._try_open_mic():
            self._turn = turn
            self._fail_turn("mic", self._mic_error or "no microphone")
            return
        assert self.mic is not None
        client = self._client
        try:
            # Stale audio from an earlier turn never leaks into this one; the conversation is kept for follow-ups.
            client.reset(conversation=False)
            # Models that keep-alive unloaded start loading now, while the person speaks.
            client.warm()
        except SottovoceError as exc:
            self._turn = turn
            self._lose_daemon(f"the daemon did not answer `reset` ({exc})")
            return
        client.chunk_errors.clear()
        client.transcript_chunks.clear()
        now = self.clock()
        start_time = self.mic.time()
        rec = Recording(start_time, self.preroll_seconds)
        turn.recording = rec
        turn.timings["capture_start"] = now
        self._turn = turn
        log.info("turn %d: recording (pre-roll %.2f s)", turn.turn, self.preroll_seconds)
        self.post(s.CaptureStarted(turn.turn))
        self._send_chunks(turn, rec.add_preroll(self._preroll.take()))
        self._next_heartbeat = now + HEARTBEAT_RECORDING

    def _send_chunks(self, turn: _Turn, chunks: list[np.ndarray]) -> None:
        if not chunks:
            return
        client = self._client
        if client is None:
            return
        try:
            for chunk in chunks:
                client.send_chunk(chunk)
                turn.sent_samples += chunk.size
        except SottovoceError as exc:
            self._lose_daemon(f"cannot send audio ({exc})")
            return
        now = self.clock()
        rec = turn.recording
        if "first_live_chunk" not in turn.timings and rec is not None and turn.sent_samples > rec.pre_samples:
            turn.timings["first_live_chunk"] = now  # the first chunk holding audio from after the press
        if "first_chunk" not in turn.timings:
            turn.timings["first_chunk"] = now
            turn.next_drain = now + DRAIN_EVERY
            log.debug("turn %d: first chunk sent", turn.turn)
        elif now >= turn.next_drain:
            turn.next_drain = now + DRAIN_EVERY
            self._drain_early_transcripts(turn)

    def _drain_early_transcripts(self, turn: _Turn) -> None:
        """Early transcripts the daemon sent while the person talks (shown in the tooltip)."""
        if self._client is None:
            return
        try:
            chunks = self._client.drain(0)
        except SottovoceError as exc:
            self._lose_daemon(str(exc))
            return
        for chunk in chunks:
            self.post(s.Hearing(turn.turn, chunk.text))

    def _on_stop(self, cmd: Stop) -> None:
        turn = self._turn
        if turn is None or turn.turn != cmd.turn or turn.recording is None:
            return
        turn.timings["key_up"] = cmd.at
        rec = turn.recording
        stop_time = self.mic.time() if self.mic is not None else None
        if stop_time is None or rec.start is None or not self._timed_blocks:
            self._finish_recording()
            return
        rec.stop = stop_time
        turn.tail_deadline = self.clock() + TAIL_MAX

    def _finish_recording(self) -> None:
        turn = self._turn
        assert turn is not None and turn.recording is not None
        rec = turn.recording
        rest = rec.finish()
        if rest is not None:
            self._send_chunks(turn, [rest])
        if self._turn is not turn:
            return  # sending failed and ended the turn
        turn.tail_deadline = None
        now = self.clock()
        turn.timings["audio_end"] = now
        if not self.keep_mic_open or self._reopen_mic_after_turn:
            self._close_mic()
            if self._reopen_mic_after_turn:
                self._reopen_mic_after_turn = False
                self._try_open_mic()
        log.info(
            "turn %d: recorded %.2f s (%d chunks, peak %.3f)",
            turn.turn,
            rec.seconds,
            -(-turn.sent_samples // p.CHUNK_SAMPLES),
            rec.peak,
        )
        if rec.samples > 0 and rec.peak == 0.0:
            self._fail_turn("silent-mic", SILENT_MIC)
            self._report_mic(SILENT_MIC)
            return
        if rec.samples < p.MIN_ASK_SAMPLES:
            self._fail_turn(
                "too-short",
                f"too short to ask ({rec.seconds:.1f} s); hold the key while you speak (at least "
                f"{p.MIN_ASK_SAMPLES / p.SAMPLE_RATE:.0f} s)",
            )
            return
        if self._check_daemon() is not None:  # lost, or restarted: the daemon no longer holds our audio
            return
        turn.recording = None
        assert self._client is not None
        try:
            turn.ask_id = self._client.begin_ask()
        except SottovoceError as exc:
            self._lose_daemon(f"cannot send the ask ({exc})")
            return
        turn.ask_sent_at = turn.last_reply_at = self.clock()
        turn.timings["ask_sent"] = turn.ask_sent_at
        turn.busy_until = turn.ask_sent_at + BUSY_RETRY_FOR

    def _pump_answer(self, timeout: float) -> None:
        turn = self._turn
        client = self._client
        assert turn is not None and turn.ask_id is not None
        if client is None:
            return
        now = self.clock()
        try:
            reply = client.next_reply(turn.ask_id, timeout)
        except RemoteError as exc:
            if exc.code == p.ErrorCode.BUSY and self.clock() < turn.busy_until:
                time.sleep(0.1)  # the cancelled ask before ours is winding down; our audio is kept
                try:
                    turn.ask_id = client.begin_ask()
                except SottovoceError as exc2:
                    self._lose_daemon(f"cannot send the ask ({exc2})")
                return
            self._fail_turn(exc.code, exc.text)
            return
        except SottovoceError as exc:
            self._lose_daemon(str(exc))
            return
        now = self.clock()
        if reply is None:
            if now - turn.last_reply_at >= PROBE_AFTER_SILENCE:
                turn.last_reply_at = now
                self._check_daemon()
            if self._turn is turn and now - turn.ask_sent_at > ANSWER_TIMEOUT:
                client.forget(turn.ask_id)
                self._fail_turn("timeout", f"no answer within {ANSWER_TIMEOUT:.0f} s")
            return
        turn.last_reply_at = now
        if isinstance(reply, p.Transcript):
            turn.timings["transcript"] = now
            turn.transcript = "" if reply.no_speech else reply.text.strip()
            self.post(s.Heard(turn.turn, turn.transcript, reply.no_speech))
        elif isinstance(reply, p.AnswerChunk):
            turn.timings.setdefault("first_answer", now)
            turn.answer.append(reply.text)
            self.post(s.AnswerDelta(turn.turn, reply.text))
        elif isinstance(reply, p.Done):
            turn.timings["done"] = now
            details = self._details(turn)
            details.update(
                tokens=reply.tokens,
                prompt_tokens=reply.prompt_tokens,
                finish_reason=reply.finish_reason,
                daemon_seconds=reply.seconds,
            )
            transcript = reply.transcript.strip() if reply.transcript is not None else turn.transcript
            self._turn = None
            self.post(s.Answered(turn.turn, transcript, reply.answer.strip(), reply.no_speech, details))

    def _details(self, turn: _Turn) -> dict[str, Any]:
        t = turn.timings
        details: dict[str, Any] = {"audio_seconds": round(turn.sent_samples / p.SAMPLE_RATE, 3)}
        details["timings"] = {k: round(v, 4) for k, v in t.items()}
        for name, a, b in (
            ("down_to_first_chunk", "key_down", "first_chunk"),
            ("down_to_first_live_chunk", "key_down", "first_live_chunk"),
            ("up_to_ask", "key_up", "ask_sent"),
            ("up_to_transcript", "key_up", "transcript"),
            ("up_to_first_answer", "key_up", "first_answer"),
            ("up_to_done", "key_up", "done"),
        ):
            if a in t and b in t:
                details[name] = round(t[b] - t[a], 4)
        return details

    def _fail_turn(self, code: str, message: str) -> None:
        turn = self._turn
        if turn is None:
            return
        log.warning("turn %d failed [%s]: %s", turn.turn, code, message)
        self._drop_turn(send_reset=False)
        self.post(s.TurnFailed(turn.turn, code, message, self._details(turn)))

    def _drop_turn(self, send_reset: bool = True) -> None:
        turn, self._turn = self._turn, None
        if turn is None:
            return
        if turn.ask_id is not None and self._client is not None:
            self._client.forget(turn.ask_id)
        if not self.keep_mic_open and turn.recording is not None:
            self._close_mic()
        if send_reset and self._client is not None and self._connected:
            try:
                self._client.reset()
            except SottovoceError as exc:
                self._set_down(str(exc))

    def _on_forget_conversation(self) -> None:
        if self._client is None or not self._connected or self._turn is not None:
            return  # the next recording's reset keeps it; a rare race, not worth a queue
        try:
            self._client.reset(conversation=True)
        except SottovoceError as exc:
            self._set_down(str(exc))

    def _on_cancel(self, cmd: Cancel) -> None:
        if self._turn is not None and self._turn.turn == cmd.turn:
            log.info("turn %d cancelled", cmd.turn)
            self._drop_turn()

    def _on_shutdown(self) -> None:
        self._stopping = True
        if self._turn is not None:
            self._drop_turn()
